//! Logging setup and the per-pipeline counters behind the periodic summary line.
//!
//! Info-level logs stay quiet per event: one line when something notable happens
//! (start, resume, retry, dead letter) and one summary per pipeline every 30 s and at stop.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};
use crate::sink::SinkStats;

/// Installs the global tracing subscriber. `RUST_LOG` overrides the configured level.
/// Calling it twice is harmless (the second call keeps the first subscriber).
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match config.format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Counters of one pipeline's chain stage.
#[derive(Debug, Default)]
pub struct PipelineStats {
    read: AtomicU64,
    filtered: AtomicU64,
    dead_lettered: AtomicU64,
    skipped: AtomicU64,
    out_of_scope: AtomicU64,
}

impl PipelineStats {
    /// One event read from the change stream.
    pub fn read(&self) {
        self.read.fetch_add(1, Ordering::Relaxed);
    }

    /// One event dropped by a filter.
    pub fn filtered(&self) {
        self.filtered.fetch_add(1, Ordering::Relaxed);
    }

    /// One event dropped because its plugin is quarantined with the `skip` action.
    pub fn skipped(&self) {
        self.skipped.fetch_add(1, Ordering::Relaxed);
    }

    /// One event outside a tenant's namespaces, stopped by the host-side check.
    pub fn out_of_scope(&self) {
        self.out_of_scope.fetch_add(1, Ordering::Relaxed);
    }

    /// One event sent to the dead-letter subject.
    pub fn dead_lettered(&self) {
        self.dead_lettered.fetch_add(1, Ordering::Relaxed);
    }

    /// Writes the summary line.
    pub fn log(&self, pipeline: &str, sink: SinkStats) {
        tracing::info!(
            pipeline,
            read = self.read.load(Ordering::Relaxed),
            filtered = self.filtered.load(Ordering::Relaxed),
            dead_lettered = self.dead_lettered.load(Ordering::Relaxed),
            skipped = self.skipped.load(Ordering::Relaxed),
            out_of_scope = self.out_of_scope.load(Ordering::Relaxed),
            published = sink.published,
            duplicates = sink.duplicates,
            retries = sink.retries,
            "pipeline summary"
        );
    }
}
