//! One series' measurements: what the event path updates (plain atomics, a few short-held
//! locks) and the derived figures `/status`, the page and the summary line read.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::histogram::{Histogram, LAG_BOUNDS, LATENCY_BOUNDS};
use super::{
    plugin, token_seconds, unix_now_ms, Labels, QuotaWait, State, HOST_FAILURE_REASONS,
    PLUGIN_FAILURE_REASONS,
};
use crate::model::Position;
use crate::ops::oplog;

/// History samples kept per series: ten minutes.
const HISTORY_LEN: usize = 121;
/// The span of `events_per_second` and `messages_per_second`.
const RATE_SPAN_MS: i64 = 60_000;
/// Longest error message kept for `/status`.
const MAX_ERROR_LEN: usize = 500;

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
    pub(super) labels: Labels,
    pub(super) read: AtomicU64,
    pub(super) filtered: AtomicU64,
    pub(super) dead_lettered: AtomicU64,
    pub(super) skipped: AtomicU64,
    pub(super) out_of_scope: AtomicU64,
    /// A shared reader's tenants reading a change stream of their own now, and those
    /// waiting for one (see `pipeline.tenant_catch_up_streams`); on the pipeline's series.
    pub(super) tenants_catching_up: AtomicI64,
    pub(super) tenants_waiting_to_catch_up: AtomicI64,
    /// Dead letters by (plugin, reason): both from bounded sets (the config's plugins,
    /// tidegate's reasons).
    pub(super) dead_letters: Mutex<std::collections::BTreeMap<(String, String), u64>>,
    pub(super) reloads_applied: AtomicU64,
    pub(super) reloads_refused: AtomicU64,
    pub(super) snapshot_documents: AtomicU64,
    pub(super) published: AtomicU64,
    pub(super) duplicates: AtomicU64,
    pub(super) retries: AtomicU64,
    pub(super) checkpoints: AtomicU64,
    pub(super) leases_lost: AtomicU64,
    /// CPU nanoseconds the unit's chain used on the worker pool.
    pub(super) chain_cpu_ns: AtomicU64,
    /// Whether the unit's last turn ran in the pool's background lane.
    pub(super) background: AtomicBool,
    /// Nanoseconds waited for each [`QuotaWait`], in [`QuotaWait::ALL`] order.
    pub(super) quota_wait_ns: [AtomicU64; 4],
    /// Unix ms when the checkpoint was last written (by any instance, as read back on
    /// load); 0 = none yet.
    pub(super) checkpoint_at_ms: AtomicI64,
    /// Unix seconds (cluster time) of the checkpointed position; 0 = unknown.
    pub(super) checkpoint_position_secs: AtomicI64,
    /// The last message id the checkpoint records.
    pub(super) checkpoint_msg_id: Mutex<Option<String>>,
    /// Whether the checkpoint carries a running snapshot's progress.
    pub(super) checkpoint_in_snapshot: AtomicBool,
    /// Unix ms of the last checkpoint that carried no snapshot progress.
    pub(super) plain_checkpoint_ms: AtomicI64,
    /// The current (or last) snapshot: documents read, the server's estimate of the total,
    /// and when it last moved (Unix ms; 0 = never).
    pub(super) snapshot_done: AtomicU64,
    pub(super) snapshot_total: AtomicU64,
    pub(super) snapshot_moved_ms: AtomicI64,
    pub(super) state: AtomicU8,
    /// What the last oplog check found.
    pub(super) oplog: Mutex<Option<oplog::Status>>,
    pub(super) last_error: Mutex<Option<LastError>>,
    /// Samples every [`HISTORY_STEP`](super::HISTORY_STEP), oldest first.
    pub(super) history: Mutex<VecDeque<Sample>>,
    pub(super) plugins: Mutex<Vec<PluginInfo>>,
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
pub(super) struct Sample {
    pub(super) at_ms: i64,
    pub(super) read: u64,
    pub(super) published: u64,
    pub(super) lag_seconds: Option<i64>,
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
    pub(super) fn new(labels: Labels) -> PipelineMetrics {
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
            tenants_catching_up: AtomicI64::new(0),
            tenants_waiting_to_catch_up: AtomicI64::new(0),
            dead_letters: Mutex::new(dead_letters),
            reloads_applied: AtomicU64::new(0),
            reloads_refused: AtomicU64::new(0),
            snapshot_documents: AtomicU64::new(0),
            published: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            leases_lost: AtomicU64::new(0),
            chain_cpu_ns: AtomicU64::new(0),
            background: AtomicBool::new(false),
            quota_wait_ns: Default::default(),
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

    /// One turn of the unit's chain on the worker pool: the CPU it used, and whether it ran
    /// in the background lane.
    pub fn chain_turn(&self, cpu: Duration, background: bool) {
        self.chain_cpu_ns
            .fetch_add(cpu.as_nanos() as u64, Ordering::Relaxed);
        self.background.store(background, Ordering::Relaxed);
    }

    /// The unit waited `wait` before its next events, for `why`.
    pub fn quota_wait(&self, why: QuotaWait, wait: Duration) {
        if let Some(i) = QuotaWait::ALL.iter().position(|w| *w == why) {
            self.quota_wait_ns[i].fetch_add(wait.as_nanos() as u64, Ordering::Relaxed);
        }
    }

    /// Seconds the unit waited for `why` so far.
    pub fn quota_wait_seconds(&self, why: QuotaWait) -> f64 {
        QuotaWait::ALL
            .iter()
            .position(|w| *w == why)
            .map_or(0.0, |i| {
                self.quota_wait_ns[i].load(Ordering::Relaxed) as f64 / 1e9
            })
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

    /// A tenant of this pipeline's shared reader starts (`1`) or stops (`-1`) waiting for a
    /// change stream of its own.
    pub fn tenant_waiting_to_catch_up(&self, delta: i64) {
        self.tenants_waiting_to_catch_up
            .fetch_add(delta, Ordering::Relaxed);
    }

    /// A tenant of this pipeline's shared reader opens (`1`) or closes (`-1`) a change
    /// stream of its own to catch up.
    pub fn tenant_catching_up(&self, delta: i64) {
        self.tenants_catching_up.fetch_add(delta, Ordering::Relaxed);
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

    /// A new run of the unit begins. What an earlier run of it in this process recorded (on
    /// another deployment, or in a record since deleted) is not known to hold: lag,
    /// checkpoint age and oplog headroom are unknown again until this run loads or writes its
    /// checkpoint, instead of alarms about a position the unit may no longer have.
    pub fn forget_checkpoint(&self) {
        self.checkpoint_at_ms.store(0, Ordering::Relaxed);
        self.checkpoint_position_secs.store(0, Ordering::Relaxed);
        if let Ok(mut kept) = self.checkpoint_msg_id.lock() {
            *kept = None;
        }
        self.checkpoint_in_snapshot.store(false, Ordering::Relaxed);
        self.plain_checkpoint_ms.store(0, Ordering::Relaxed);
        if let Ok(mut kept) = self.oplog.lock() {
            *kept = None;
        }
    }

    fn record_checkpoint(&self, position: &Position, at_ms: i64) {
        self.checkpoint_at_ms.store(at_ms, Ordering::Relaxed);
        // A token without a readable time leaves the position unknown, not the last one.
        let secs = token_seconds(&position.token).unwrap_or(0);
        self.checkpoint_position_secs.store(secs, Ordering::Relaxed);
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

    /// Appends a history sample (see [`HISTORY_STEP`](super::HISTORY_STEP)).
    pub(super) fn sample(&self) {
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
}
