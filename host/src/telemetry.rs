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

/// Records a snapshot's progress for `/status`, and draws its progress bar on stderr when
/// that is an interactive terminal (elsewhere the per-chunk log line, `/status` and the
/// `tidegate_snapshot_documents_total` metric carry it). The
/// bar is redrawn in place; log lines may push it down, and the next chunk redraws it.
pub fn snapshot_progress(pipeline: &str, done: u64, total: u64) {
    crate::metrics::pipeline(pipeline).snapshot_progress(done, total);
    if !std::io::stderr().is_terminal() {
        return;
    }
    eprint!("\r\x1b[2K{}", progress_line(pipeline, done, total));
    if done >= total {
        eprintln!();
    }
}

/// A duration for people: `45 s`, `12 min`, `5 h`, `3 days` (rounded down).
pub fn human_duration(seconds: i64) -> String {
    match seconds.max(0) {
        s if s < 120 => format!("{s} s"),
        s if s < 2 * 3600 => format!("{} min", s / 60),
        s if s < 2 * 86_400 => format!("{} h", s / 3600),
        s => format!("{} days", s / 86_400),
    }
}

/// `<pipeline> snapshot [#####-----]  50% 500/1000`; `total` is the server's estimate, so
/// `done` may pass it.
fn progress_line(pipeline: &str, done: u64, total: u64) -> String {
    const WIDTH: u64 = 30;
    let total = total.max(done).max(1);
    let filled = (done * WIDTH / total) as usize;
    format!(
        "{pipeline} snapshot [{}{}] {:>3}% {done}/{total}",
        "#".repeat(filled),
        "-".repeat(WIDTH as usize - filled),
        done * 100 / total
    )
}

#[cfg(test)]
mod tests {
    use super::{human_duration, progress_line};

    #[test]
    fn durations_for_people() {
        assert_eq!(human_duration(-3), "0 s");
        assert_eq!(human_duration(119), "119 s");
        assert_eq!(human_duration(600), "10 min");
        assert_eq!(human_duration(3 * 3600 + 5), "3 h");
        assert_eq!(human_duration(3 * 86_400), "3 days");
    }

    #[test]
    fn progress_bar_text() {
        assert_eq!(
            progress_line("shop", 500, 1000),
            "shop snapshot [###############---------------]  50% 500/1000"
        );
        assert!(progress_line("shop", 1200, 1000).contains("100% 1200/1200"));
        assert!(progress_line("shop", 0, 0).contains("  0% 0/1"));
    }
}
