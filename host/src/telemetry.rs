//! Logging setup. (The per-pipeline counters behind the periodic summary line live in
//! [`metrics`](crate::metrics).)
//!
//! Info-level logs stay quiet per event: one line when something notable happens
//! (start, resume, retry, dead letter) and one summary per pipeline every 30 s and at stop.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

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

/// The counters of one pipeline's stages (kept in the [`metrics`](crate::metrics) registry).
pub type PipelineStats = crate::metrics::PipelineMetrics;
