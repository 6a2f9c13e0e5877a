//! Every number tidegate exposes, in one registry: counters, gauges and histograms per
//! series, rendered as Prometheus text for `/metrics` and read by `/status` and the summary
//! log line.
//!
//! A series is one pipeline (and, as pipelines gain tenants, one tenant of it): its
//! [`Labels`] come from the configuration only, never from event data, so the number of
//! series is bounded by the config. Stages find their series with [`series`] (or
//! [`pipeline`]) and update plain atomics; nothing here blocks the event path.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mongodb::change_stream::event::ResumeToken;

use crate::model::Position;
use crate::ops::oplog;

/// How often [`Registry::sample_history`] is called: the step of `/status`'s history and of
/// the page's graphs.
pub const HISTORY_STEP: Duration = Duration::from_secs(5);
/// History samples kept per series: ten minutes.
const HISTORY_LEN: usize = 121;
/// The span of `events_per_second` and `messages_per_second`.
const RATE_SPAN_MS: i64 = 60_000;
/// Longest error message kept for `/status`.
const MAX_ERROR_LEN: usize = 500;

/// Why a plugin's call dead-letters an event: the `reason` label values of
/// `tidegate_dead_letters_total` with a plugin, declared at zero.
pub const PLUGIN_FAILURE_REASONS: [crate::model::failure::FailureKind; 8] =
    crate::model::failure::FailureKind::PLUGIN_DECLARED;
/// Why the host dead-letters an event itself (`sink::framer`), with an empty `plugin`.
pub const HOST_FAILURE_REASONS: [crate::model::failure::FailureKind; 2] =
    crate::model::failure::FailureKind::HOST_DECLARED;

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
/// End-to-end lag, from a millisecond up to an hour (read from the change's `wallTime`,
/// which has millisecond resolution; before MongoDB 6.0 from its cluster time, to the second).
const LAG_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0,
];

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
    /// Unix ms when the checkpoint was last written (by any instance, as read back on
    /// load); 0 = none yet.
    checkpoint_at_ms: AtomicI64,
    /// Unix seconds (cluster time) of the checkpointed position; 0 = unknown.
    checkpoint_position_secs: AtomicI64,
    /// The last message id the checkpoint records.
    checkpoint_msg_id: Mutex<Option<String>>,
    /// Whether the checkpoint carries a running snapshot's progress.
    checkpoint_in_snapshot: AtomicBool,
    /// Unix ms of the last checkpoint that carried no snapshot progress.
    plain_checkpoint_ms: AtomicI64,
    /// The current (or last) snapshot: documents read, the server's estimate of the total,
    /// and when it last moved (Unix ms; 0 = never).
    snapshot_done: AtomicU64,
    snapshot_total: AtomicU64,
    snapshot_moved_ms: AtomicI64,
    state: AtomicU8,
    /// What the last oplog check found.
    oplog: Mutex<Option<oplog::Status>>,
    last_error: Mutex<Option<LastError>>,
    /// Samples every [`HISTORY_STEP`], oldest first.
    history: Mutex<VecDeque<Sample>>,
    plugins: Mutex<Vec<PluginInfo>>,
    /// Time from handing a message to the client to its JetStream acknowledgement.
    pub publish_latency: Histogram,
    /// Time from a change's commit in MongoDB to its acknowledgement by JetStream.
    pub lag: Histogram,
}

/// A unit's most recent error.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LastError {
    /// What went wrong, without URLs.
    pub message: String,
    /// When, Unix milliseconds.
    pub at_unix_ms: i64,
}

/// One point of a series' recent history.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at_ms: i64,
    read: u64,
    published: u64,
    lag_seconds: Option<i64>,
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
        // Every known label set of a labelled counter exists from the start, at zero.
        let dead_letters = HOST_FAILURE_REASONS
            .iter()
            .map(|reason| ((String::new(), reason.to_string()), 0))
            .collect();
        PipelineMetrics {
            labels,
            read: AtomicU64::new(0),
            filtered: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            out_of_scope: AtomicU64::new(0),
            dead_letters: Mutex::new(dead_letters),
            reloads_applied: AtomicU64::new(0),
            reloads_refused: AtomicU64::new(0),
            snapshot_documents: AtomicU64::new(0),
            published: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            leases_lost: AtomicU64::new(0),
            checkpoint_at_ms: AtomicI64::new(0),
            checkpoint_position_secs: AtomicI64::new(0),
            checkpoint_msg_id: Mutex::new(None),
            checkpoint_in_snapshot: AtomicBool::new(false),
            plain_checkpoint_ms: AtomicI64::new(0),
            snapshot_done: AtomicU64::new(0),
            snapshot_total: AtomicU64::new(0),
            snapshot_moved_ms: AtomicI64::new(0),
            state: AtomicU8::new(State::Starting as u8),
            oplog: Mutex::new(None),
            last_error: Mutex::new(None),
            history: Mutex::new(VecDeque::from([Sample {
                at_ms: unix_now_ms(),
                read: 0,
                published: 0,
                lag_seconds: None,
            }])),
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

    /// A change committed at `commit_unix_ms` was acknowledged by JetStream: one
    /// observation of the end-to-end lag.
    pub fn change_acked(&self, commit_unix_ms: i64) {
        let lag = u64::try_from(unix_now_ms() - commit_unix_ms).unwrap_or(0);
        self.lag.observe(Duration::from_millis(lag));
    }

    /// A checkpoint was written with `position`.
    pub fn checkpointed(&self, position: &Position) {
        self.checkpoints.fetch_add(1, Ordering::Relaxed);
        self.record_checkpoint(position, unix_now_ms());
    }

    /// The checkpoint `position`, written at `saved_unix_ms` (if the record says), was
    /// loaded at start: it is the position until the first write.
    pub fn checkpoint_loaded(&self, position: &Position, saved_unix_ms: Option<i64>) {
        self.record_checkpoint(position, saved_unix_ms.unwrap_or_else(unix_now_ms));
    }

    fn record_checkpoint(&self, position: &Position, at_ms: i64) {
        self.checkpoint_at_ms.store(at_ms, Ordering::Relaxed);
        if let Some(secs) = token_seconds(&position.token) {
            self.checkpoint_position_secs.store(secs, Ordering::Relaxed);
        }
        if let Ok(mut kept) = self.checkpoint_msg_id.lock() {
            if kept.as_deref() != position.last_msg_id.as_deref() {
                kept.clone_from(&position.last_msg_id);
            }
        }
        let in_snapshot = position.snapshot.is_some();
        self.checkpoint_in_snapshot
            .store(in_snapshot, Ordering::Relaxed);
        if !in_snapshot {
            self.plain_checkpoint_ms.store(at_ms, Ordering::Relaxed);
        }
    }

    /// Unix seconds (cluster time) of the checkpointed position, if known.
    pub fn checkpoint_position_secs(&self) -> Option<i64> {
        match self.checkpoint_position_secs.load(Ordering::Relaxed) {
            0 => None,
            secs => Some(secs),
        }
    }

    /// A snapshot has read `done` documents of about `total`.
    pub fn snapshot_progress(&self, done: u64, total: u64) {
        self.snapshot_done.store(done, Ordering::Relaxed);
        self.snapshot_total.store(total, Ordering::Relaxed);
        self.snapshot_moved_ms
            .store(unix_now_ms(), Ordering::Relaxed);
    }

    /// Whether a snapshot runs: its progress moved since the last checkpoint without
    /// snapshot progress, or the checkpoint still carries its progress.
    pub fn snapshot_active(&self) -> bool {
        self.checkpoint_in_snapshot.load(Ordering::Relaxed)
            || self.snapshot_moved_ms.load(Ordering::Relaxed)
                > self.plain_checkpoint_ms.load(Ordering::Relaxed)
    }

    /// Records an error the unit met (and recovers from, or stops on); URLs are left out.
    pub fn set_error(&self, message: &str) {
        let message: String = message
            .split(' ')
            .map(|word| match word.contains("://") {
                true => "<url>",
                false => word,
            })
            .collect::<Vec<_>>()
            .join(" ")
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(MAX_ERROR_LEN)
            .collect();
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(LastError {
                message,
                at_unix_ms: unix_now_ms(),
            });
        }
    }

    /// The unit waits to retry after `error`.
    pub fn retrying(&self, error: &str) {
        self.set_error(error);
        self.set_state(State::Retrying);
    }

    /// The unit's most recent error, if any.
    pub fn last_error(&self) -> Option<LastError> {
        self.last_error.lock().ok().and_then(|e| e.clone())
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

    /// Records the chain's plugins, and declares their counters at zero.
    pub fn set_plugins(&self, plugins: Vec<PluginInfo>) {
        if let Ok(mut reasons) = self.dead_letters.lock() {
            for p in &plugins {
                for reason in PLUGIN_FAILURE_REASONS {
                    reasons
                        .entry((p.name.clone(), reason.to_string()))
                        .or_default();
                }
            }
        }
        for p in &plugins {
            plugin(&self.labels, &p.name);
        }
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

    /// The lag: seconds between the checkpointed position's cluster time and now; `None`
    /// before the first checkpoint. (While the stream is idle the position still moves, with
    /// post-batch resume tokens, so an idle pipeline's lag stays small.)
    pub fn lag_seconds(&self) -> Option<i64> {
        self.checkpoint_position_secs()
            .map(|secs| (unix_now_ms() / 1000 - secs).max(0))
    }

    /// The checkpoint age: seconds since the checkpoint was last written; `None` before the
    /// first.
    pub fn checkpoint_age_seconds(&self) -> Option<f64> {
        match self.checkpoint_at_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some((unix_now_ms() - ms).max(0) as f64 / 1000.0),
        }
    }

    /// Records what an oplog check found.
    pub fn set_oplog(&self, status: oplog::Status) {
        if let Ok(mut kept) = self.oplog.lock() {
            *kept = Some(status);
        }
    }

    /// What the last oplog check found, if the oplog could be read.
    pub fn oplog(&self) -> Option<oplog::Status> {
        self.oplog.lock().ok().and_then(|o| o.clone())
    }

    /// Appends a history sample (see [`HISTORY_STEP`]).
    fn sample(&self) {
        let c = self.counts();
        let sample = Sample {
            at_ms: unix_now_ms(),
            read: c.read,
            published: c.published,
            lag_seconds: self.lag_seconds(),
        };
        if let Ok(mut history) = self.history.lock() {
            history.push_back(sample);
            while history.len() > HISTORY_LEN {
                history.pop_front();
            }
        }
    }

    /// Events read and messages published per second over the last minute of history (or
    /// since the series began, if younger); `None` before the second sample.
    pub fn rates(&self) -> Option<(f64, f64)> {
        let history = self.history.lock().ok()?;
        let last = history.back()?;
        let first = history
            .iter()
            .rev()
            .find(|s| s.at_ms <= last.at_ms - RATE_SPAN_MS)
            .or(history.front())?;
        let seconds = (last.at_ms - first.at_ms) as f64 / 1000.0;
        (seconds > 0.0).then(|| {
            (
                (last.read - first.read) as f64 / seconds,
                (last.published - first.published) as f64 / seconds,
            )
        })
    }

    /// The history as `(events read per second since the previous sample, lag)` per sample,
    /// oldest first.
    pub fn history(&self) -> Vec<(f64, Option<i64>)> {
        let Ok(history) = self.history.lock() else {
            return Vec::new();
        };
        history
            .iter()
            .zip(history.iter().skip(1))
            .map(|(a, b)| {
                let seconds = ((b.at_ms - a.at_ms) as f64 / 1000.0).max(0.001);
                ((b.read - a.read) as f64 / seconds, b.lag_seconds)
            })
            .collect()
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

    /// This series as `/status` JSON (docs/operations.md describes every field).
    pub fn status(&self) -> serde_json::Value {
        let c = self.counts();
        let labels: serde_json::Map<String, serde_json::Value> = self
            .labels
            .0
            .iter()
            .map(|(n, v)| (n.to_string(), v.clone().into()))
            .collect();
        let rates = self.rates();
        let history = self.history();
        let snapshot_total = self.snapshot_total.load(Ordering::Relaxed);
        serde_json::json!({
            "labels": labels,
            "state": self.state().name(),
            "last_error": self.last_error().map(|e| serde_json::json!({
                "message": e.message,
                "at_unix_ms": e.at_unix_ms,
                "age_seconds": (unix_now_ms() - e.at_unix_ms).max(0) as f64 / 1000.0,
            })),
            "position": {
                "last_msg_id": self.checkpoint_msg_id.lock().ok().and_then(|id| id.clone()),
                "change_time_unix": self.checkpoint_position_secs(),
            },
            "lag_seconds": self.lag_seconds(),
            "checkpoint_age_seconds": self.checkpoint_age_seconds(),
            "events_per_second": rates.map(|r| r.0),
            "messages_per_second": rates.map(|r| r.1),
            "oplog": self.oplog(),
            "snapshot": {
                "active": self.snapshot_active(),
                "documents": self.snapshot_done.load(Ordering::Relaxed),
                "estimated_total": (snapshot_total > 0).then_some(snapshot_total),
            },
            "counts": {
                "read": c.read,
                "filtered": c.filtered,
                "dead_lettered": c.dead_lettered,
                "skipped": self.skipped.load(Ordering::Relaxed),
                "out_of_scope": self.out_of_scope.load(Ordering::Relaxed),
                "published": c.published,
                "duplicates": c.duplicates,
                "retries": c.retries,
                "checkpoints": self.checkpoints.load(Ordering::Relaxed),
                "snapshot_documents": self.snapshot_documents.load(Ordering::Relaxed),
                "leases_lost": self.leases_lost.load(Ordering::Relaxed),
            },
            "history": {
                "step_seconds": HISTORY_STEP.as_secs(),
                "events_per_second": history.iter().map(|h| h.0).collect::<Vec<_>>(),
                "lag_seconds": history.iter().map(|h| h.1).collect::<Vec<_>>(),
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

    /// The Prometheus text exposition (format 0.0.4) of every series.
    pub fn render(&self) -> String {
        let all = self.all();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP tidegate_build_info The running version.\n# TYPE tidegate_build_info gauge\ntidegate_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        let _ = writeln!(
            out,
            "# HELP tidegate_uptime_seconds Seconds since the process started.\n# TYPE tidegate_uptime_seconds gauge\ntidegate_uptime_seconds {}",
            self.uptime_seconds()
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
                "Seconds since the checkpoint was last written.",
                |m| m.checkpoint_age_seconds(),
            ),
            (
                "tidegate_lag_seconds",
                "gauge",
                "Seconds between the checkpointed position's cluster time and now.",
                |m| m.lag_seconds().map(|s| s as f64),
            ),
            (
                "tidegate_oplog_headroom_seconds",
                "gauge",
                "Projected seconds until the oplog overwrites the checkpointed position, at the current write rate.",
                |m| m.oplog().and_then(|o| o.headroom_seconds),
            ),
            (
                "tidegate_oplog_window_seconds",
                "gauge",
                "Seconds between the oplog's oldest and newest entries (what it holds now, not its capacity).",
                |m| m.oplog().map(|o| o.window_seconds as f64),
            ),
            (
                "tidegate_oplog_size_bytes",
                "gauge",
                "Bytes the oplog holds.",
                |m| m.oplog().map(|o| o.size_bytes as f64),
            ),
            (
                "tidegate_oplog_max_size_bytes",
                "gauge",
                "The oplog's configured maximum size.",
                |m| m.oplog().map(|o| o.max_bytes as f64),
            ),
            (
                "tidegate_oplog_write_bytes_per_second",
                "gauge",
                "Bytes written to the oplog per second over its last readings.",
                |m| m.oplog().and_then(|o| o.write_bytes_per_second),
            ),
            (
                "tidegate_last_error_timestamp_seconds",
                "gauge",
                "Unix time of the unit's most recent error (its text is on /status).",
                |m| m.last_error().map(|e| e.at_unix_ms as f64 / 1000.0),
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
            ("tidegate_end_to_end_lag_seconds", "Time from a change's commit in MongoDB (its wallTime) to its acknowledgement by JetStream.", |m| &m.lag),
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
            "# HELP {name} Most memory an instance of the plugin held: all its linear memories and tables together.\n# TYPE {name} gauge"
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
    fn lag_and_checkpoint_age_come_from_the_checkpoint() {
        let m = PipelineMetrics::new(Labels::pipeline("p"));
        assert_eq!((m.lag_seconds(), m.checkpoint_age_seconds()), (None, None));
        let now = unix_now_ms() / 1000;
        let token: ResumeToken = bson::deserialize_from_bson(bson::Bson::Document(
            bson::doc! { "_data": format!("82{:08X}00000001", now - 30) },
        ))
        .expect("token");
        let position = Position {
            token,
            last_msg_id: Some("p:1:0".into()),
            snapshot: None,
        };
        // Written 2 s ago by an earlier run, holding a position 30 s old.
        m.checkpoint_loaded(&position, Some(unix_now_ms() - 2000));
        let lag = m.lag_seconds().expect("lag");
        assert!((30..32).contains(&lag), "{lag}");
        let age = m.checkpoint_age_seconds().expect("age");
        assert!((2.0..3.0).contains(&age), "{age}");
        m.checkpointed(&position);
        assert!(m.checkpoint_age_seconds().expect("age") < 1.0);
        assert_eq!(m.status()["position"]["last_msg_id"], "p:1:0");
    }

    #[test]
    fn known_counters_exist_at_zero() {
        let m = PipelineMetrics::new(Labels::pipeline("zero"));
        m.set_plugins(vec![PluginInfo {
            name: "f".into(),
            world: "filter".into(),
            sha256: String::new(),
        }]);
        let mut out = String::new();
        registry().render_labelled(&mut out, &[Arc::new(m)]);
        assert!(out.contains(
            "tidegate_dead_letters_total{pipeline=\"zero\",plugin=\"f\",reason=\"out-of-fuel\"} 0\n"
        ));
        assert!(out.contains(
            "tidegate_dead_letters_total{pipeline=\"zero\",plugin=\"\",reason=\"too-large\"} 0\n"
        ));
    }

    #[test]
    fn rates_over_the_history() {
        let m = PipelineMetrics::new(Labels::pipeline("r"));
        assert_eq!(m.rates(), None);
        if let Ok(mut history) = m.history.lock() {
            let t = history[0].at_ms;
            for (i, read) in [(1, 100), (2, 200), (13, 1300)] {
                history.push_back(Sample {
                    at_ms: t + i * 5000,
                    read,
                    published: read / 2,
                    lag_seconds: Some(1),
                });
            }
        }
        // The last minute: from the sample 60 s before the newest one.
        assert_eq!(m.rates(), Some((20.0, 10.0)));
        assert_eq!(m.history().len(), 3);
        assert_eq!(m.history()[0], (20.0, Some(1)));
    }

    #[test]
    fn labels_are_escaped_and_extensible() {
        let labels = Labels::pipeline("a\"b").with("tenant", "t1");
        assert_eq!(labels.render(), "pipeline=\"a\\\"b\",tenant=\"t1\"");
        assert_eq!(labels.get("tenant"), Some("t1"));
    }
}
