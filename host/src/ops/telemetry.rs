//! Logging setup. (The per-pipeline counters behind the periodic summary line live in
//! [`metrics`](crate::ops::metrics).)
//!
//! Info-level logs stay quiet per event: one line when something notable happens
//! (start, resume, retry, dead letter) and one summary per pipeline every 30 s and at stop.

use std::borrow::Cow;
use std::io::{IsTerminal, Write};

use tracing_subscriber::filter::{filter_fn, FilterExt};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogConfig, LogFormat};

/// Client libraries whose debug and trace output can carry credentials, whatever the
/// configured level: async-nats prints the server URL at debug and the whole `CONNECT`
/// (password, token, JWT) at trace; the MongoDB driver and rustls print connection and
/// handshake details. Their events above `info` are dropped.
const CAPPED_TARGETS: &[&str] = &["async_nats", "mongodb", "rustls", "tokio_rustls", "nkeys"];

/// Whether an event or span of `target` at `level` may be logged despite [`CAPPED_TARGETS`].
pub fn allowed_for_library(target: &str, level: &tracing::Level) -> bool {
    let capped = CAPPED_TARGETS.iter().any(|lib| {
        target == *lib
            || target
                .strip_prefix(lib)
                .is_some_and(|rest| rest.starts_with("::"))
    });
    !capped || *level <= tracing::Level::INFO
}

/// Installs the global tracing subscriber. `RUST_LOG` overrides the configured level, but
/// never lifts [`CAPPED_TARGETS`] above `info`; and every line passes through
/// [`crate::security::scrub`] before it is written. Calling it twice is harmless (the
/// second call keeps the first subscriber).
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let filter = filter.and(filter_fn(|meta| {
        allowed_for_library(meta.target(), meta.level())
    }));
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(|| ScrubbingStderr)
        .with_ansi(std::io::stderr().is_terminal());
    let layer = match config.format {
        LogFormat::Human => layer.with_filter(filter).boxed(),
        LogFormat::Json => layer.json().with_filter(filter).boxed(),
    };
    let _ = tracing_subscriber::registry().with(layer).try_init();
}

/// Standard error with every remembered secret replaced (see [`crate::security::scrub`]).
/// The formatter writes each event with one `write_all`, so a secret is never split between
/// two writes.
struct ScrubbingStderr;

impl Write for ScrubbingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        std::io::stderr().write_all(crate::security::scrub(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Text a plugin supplied (a log message, an error, an id it returned) made safe for a log
/// line: control characters and Unicode line separators become visible escapes (`\n`,
/// `\r`, `\u{1b}`…), so nothing a plugin writes can start a line that looks like
/// tidegate's own or restyle a terminal. The human format prints text as it is (the JSON
/// format escapes on its own, and then shows these escapes escaped once more). Escaping
/// twice changes nothing.
pub fn escape(text: &str) -> Cow<'_, str> {
    fn unsafe_in_logs(c: char) -> bool {
        c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')
    }
    if !text.chars().any(unsafe_in_logs) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if unsafe_in_logs(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// The counters of one pipeline's stages (kept in the [`metrics`](crate::ops::metrics) registry).
pub type PipelineStats = crate::ops::metrics::PipelineMetrics;

/// Records a snapshot's progress for `/status`, and draws its progress bar on stderr when
/// that is an interactive terminal (elsewhere the per-chunk log line, `/status` and the
/// `tidegate_snapshot_documents_total` metric carry it). The
/// bar is redrawn in place; log lines may push it down, and the next chunk redraws it.
pub fn snapshot_progress(pipeline: &str, done: u64, total: u64) {
    crate::ops::metrics::pipeline(pipeline).snapshot_progress(done, total);
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
    use super::{allowed_for_library, escape, human_duration, progress_line};
    use tracing::Level;

    /// Libraries that print credentials at debug or trace are held at info.
    #[test]
    fn credential_printing_libraries_are_capped() {
        assert!(!allowed_for_library("async_nats", &Level::DEBUG));
        assert!(!allowed_for_library("async_nats::connector", &Level::TRACE));
        assert!(!allowed_for_library("mongodb::connection", &Level::DEBUG));
        assert!(!allowed_for_library("rustls::client::hs", &Level::TRACE));
        assert!(allowed_for_library("async_nats::connector", &Level::INFO));
        assert!(allowed_for_library("tidegate::pipeline", &Level::TRACE));
        assert!(allowed_for_library("async_natsx", &Level::TRACE));
    }

    #[test]
    fn plugin_text_cannot_break_lines() {
        let forged = "ok\n2026-01-01T00:00:00Z  INFO tidegate: lease taken\r\x1b[2J\u{2028}";
        let escaped = escape(forged);
        assert_eq!(
            escaped,
            "ok\\n2026-01-01T00:00:00Z  INFO tidegate: lease taken\\r\\u{1b}[2J\\u{2028}"
        );
        assert_eq!(escape(&escaped), escaped, "escaping twice changes nothing");
        assert!(matches!(
            escape("plain ünïcode"),
            std::borrow::Cow::Borrowed(_)
        ));
    }

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
