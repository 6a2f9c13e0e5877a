//! The Prometheus text exposition (format 0.0.4) of the registry: one function per group of
//! families, each family's `# HELP`/`# TYPE` header written once before its samples, in the
//! order scrapers and tests have always seen.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::labels::escape;
use super::SIGNAL_OUTCOMES;
use super::{signal_counts, Histogram, PipelineMetrics, PluginMetrics, QuotaWait, Registry, State};

/// A family with one sample per series: its name, its help text, and how to read a series'
/// value (`None`: no sample for that series, e.g. before the first oplog check).
type Family = (
    &'static str,
    &'static str,
    fn(&PipelineMetrics) -> Option<f64>,
);

/// The per-series counters, in exposition order.
const COUNTERS: &[Family] = &[
    (
        "tidegate_events_read_total",
        "Change events read from MongoDB.",
        |m| Some(m.read.load(Ordering::Relaxed) as f64),
    ),
    (
        "tidegate_events_filtered_total",
        "Events a filter plugin dropped.",
        |m| Some(m.filtered.load(Ordering::Relaxed) as f64),
    ),
    (
        "tidegate_events_dead_lettered_total",
        "Events sent to the dead-letter subject.",
        |m| Some(m.dead_lettered.load(Ordering::Relaxed) as f64),
    ),
    (
        "tidegate_snapshot_documents_total",
        "Documents read by snapshots (initial and incremental): their progress.",
        |m| Some(m.snapshot_documents.load(Ordering::Relaxed) as f64),
    ),
    (
        "tidegate_events_skipped_total",
        "Events dropped because their plugin is quarantined with the `skip` action.",
        |m| Some(m.skipped.load(Ordering::Relaxed) as f64),
    ),
    (
        "tidegate_events_out_of_scope_total",
        "Events outside a tenant's namespaces, stopped in the host (should stay 0).",
        |m| Some(m.out_of_scope.load(Ordering::Relaxed) as f64),
    ),
    (
        "tidegate_messages_published_total",
        "Messages JetStream stored.",
        |m| Some(m.published.load(Ordering::Relaxed) as f64),
    ),
    (
        "tidegate_messages_duplicate_total",
        "Messages JetStream deduplicated (already stored).",
        |m| Some(m.duplicates.load(Ordering::Relaxed) as f64),
    ),
    (
        "tidegate_publish_retries_total",
        "Failed publishes that were retried.",
        |m| Some(m.retries.load(Ordering::Relaxed) as f64),
    ),
    ("tidegate_checkpoints_total", "Checkpoints written.", |m| {
        Some(m.checkpoints.load(Ordering::Relaxed) as f64)
    }),
    (
        "tidegate_chain_cpu_seconds_total",
        "CPU time the unit's plugin chain (and framing) used on the worker pool.",
        |m| Some(m.chain_cpu_ns.load(Ordering::Relaxed) as f64 / 1e9),
    ),
    (
        "tidegate_leases_lost_total",
        "Times this instance lost the pipeline's lease (high availability).",
        |m| Some(m.leases_lost.load(Ordering::Relaxed) as f64),
    ),
];

/// The per-series gauges, in exposition order (after the counters).
const GAUGES: &[Family] = &[
    (
        "tidegate_checkpoint_age_seconds",
        "Seconds since the checkpoint was last written.",
        |m| m.checkpoint_age_seconds(),
    ),
    (
        "tidegate_lag_seconds",
        "Seconds between the checkpointed position's cluster time and now.",
        |m| m.lag_seconds().map(|s| s as f64),
    ),
    (
        "tidegate_oplog_headroom_seconds",
        "Projected seconds until the oplog overwrites the checkpointed position, at the current write rate.",
        |m| m.oplog().and_then(|o| o.headroom_seconds),
    ),
    (
        "tidegate_oplog_window_seconds",
        "Seconds between the oplog's oldest and newest entries (what it holds now, not its capacity).",
        |m| m.oplog().map(|o| o.window_seconds as f64),
    ),
    (
        "tidegate_oplog_size_bytes",
        "Bytes the oplog holds.",
        |m| m.oplog().map(|o| o.size_bytes as f64),
    ),
    (
        "tidegate_oplog_max_size_bytes",
        "The oplog's configured maximum size.",
        |m| m.oplog().map(|o| o.max_bytes as f64),
    ),
    (
        "tidegate_oplog_write_bytes_per_second",
        "Bytes written to the oplog per second over its last readings.",
        |m| m.oplog().and_then(|o| o.write_bytes_per_second),
    ),
    (
        "tidegate_last_error_timestamp_seconds",
        "Unix time of the unit's most recent error (its text is on /status).",
        |m| m.last_error().map(|e| e.at_unix_ms as f64 / 1000.0),
    ),
    (
        "tidegate_chain_background",
        "1 while the unit's chain runs on the worker pool's low-priority background workers (it used more than its fair share of CPU).",
        |m| Some(if m.background.load(Ordering::Relaxed) { 1.0 } else { 0.0 }),
    ),
    (
        "tidegate_pipeline_running",
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
        "tidegate_tenants_catching_up",
        "A shared reader's tenants reading a change stream of their own (catching up), at most pipeline.tenant_catch_up_streams; on the pipeline's series.",
        |m| Some(m.tenants_catching_up.load(Ordering::Relaxed) as f64),
    ),
    (
        "tidegate_tenants_waiting_to_catch_up",
        "A shared reader's tenants waiting, detached, for a change stream of their own (pipeline.tenant_catch_up_streams are in use); on the pipeline's series.",
        |m| Some(m.tenants_waiting_to_catch_up.load(Ordering::Relaxed) as f64),
    ),
    (
        "tidegate_pipeline_held",
        "1 while a tenant is held: its plugins do not load, it reads nothing and keeps its checkpoint (the error is on /status); /readyz leaves it out.",
        |m| Some(if m.state() == State::Held { 1.0 } else { 0.0 }),
    ),
    (
        "tidegate_pipeline_standby",
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

impl Registry {
    /// The Prometheus text exposition (format 0.0.4) of every series.
    pub fn render(&self) -> String {
        let all = self.all();
        let mut out = String::new();
        process_families(&mut out, self.uptime_seconds());
        series_families(&mut out, "counter", COUNTERS, &all);
        series_families(&mut out, "gauge", GAUGES, &all);
        self.render_labelled(&mut out, &all);
        render_signals(&mut out, &all);
        series_histograms(&mut out, &all);
        let plugins: Vec<Arc<PluginMetrics>> = self
            .plugins
            .lock()
            .map(|all| all.values().cloned().collect())
            .unwrap_or_default();
        plugin_families(&mut out, &plugins);
        out
    }

    /// The families with a label beyond the series' own: per plugin, reason or outcome.
    pub(super) fn render_labelled(&self, out: &mut String, all: &[Arc<PipelineMetrics>]) {
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
            "tidegate_quota_wait_seconds_total",
            "counter",
            "Seconds the unit waited before its next events, by quota (or breach_pause): throttled, nothing dropped.",
        );
        for m in all {
            let labels = m.labels.render();
            for why in QuotaWait::ALL {
                let _ = writeln!(
                    out,
                    "tidegate_quota_wait_seconds_total{{{labels},quota=\"{}\"}} {}",
                    why.as_str(),
                    m.quota_wait_seconds(why)
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

/// The process's own families: its version and uptime.
fn process_families(out: &mut String, uptime_seconds: f64) {
    let _ = writeln!(
        out,
        "# HELP tidegate_build_info The running version.\n# TYPE tidegate_build_info gauge\ntidegate_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    let _ = writeln!(
        out,
        "# HELP tidegate_uptime_seconds Seconds since the process started.\n# TYPE tidegate_uptime_seconds gauge\ntidegate_uptime_seconds {}",
        uptime_seconds
    );
}

/// `families` of type `kind`, one sample per series that has a value.
fn series_families(
    out: &mut String,
    kind: &str,
    families: &[Family],
    all: &[Arc<PipelineMetrics>],
) {
    for (name, help, read) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for m in all {
            if let Some(value) = read(m) {
                let _ = writeln!(out, "{name}{{{}}} {value}", m.labels.render());
            }
        }
    }
}

/// The per-series histograms: publish latency and end-to-end lag.
fn series_histograms(out: &mut String, all: &[Arc<PipelineMetrics>]) {
    type Get = fn(&PipelineMetrics) -> &Histogram;
    let histograms: &[(&str, &str, Get)] = &[
        ("tidegate_publish_latency_seconds", "Time from publishing a message to its JetStream acknowledgement.", |m| &m.publish_latency),
        ("tidegate_end_to_end_lag_seconds", "Time from a change's commit in MongoDB (its wallTime) to its acknowledgement by JetStream.", |m| &m.lag),
    ];
    for (name, help, get) in histograms {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for m in all {
            get(m).render(out, name, &m.labels.render());
        }
    }
}

/// The per-plugin families: calls, failures, fuel, memory peak and call time.
fn plugin_families(out: &mut String, plugins: &[Arc<PluginMetrics>]) {
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
        for m in plugins {
            let _ = writeln!(out, "{name}{{{}}} {}", m.labels.render(), read(m));
        }
    }
    let name = "tidegate_plugin_memory_peak_bytes";
    let _ = writeln!(
        out,
        "# HELP {name} Most memory an instance of the plugin held: all its linear memories and tables together.\n# TYPE {name} gauge"
    );
    for m in plugins {
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
    for m in plugins {
        m.call_time.render(out, name, &m.labels.render());
    }
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
