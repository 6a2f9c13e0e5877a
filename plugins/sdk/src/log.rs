//! Writing to tidegate's log, tagged with the plugin's name.
//!
//! In the wasm guest, lines go to the host (at most 32 per call; the rest are counted and
//! dropped). Natively — in unit tests — they are kept per thread, and [`captured`] returns
//! them, so a test can assert that a plugin warned.

/// Severity of a log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Detailed diagnostics, off by default in the host.
    Debug,
    /// Routine information.
    Info,
    /// Something unexpected that the plugin worked around.
    Warn,
    /// Something failed.
    Error,
}

/// Writes one line at `level`.
///
/// ```
/// use tidegate_plugin::log::{self, Level};
/// log::write(Level::Info, "hello");
/// assert_eq!(log::captured(), [(Level::Info, "hello".to_owned())]);
/// ```
pub fn write(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    crate::guest::log(level, message);
    #[cfg(not(target_arch = "wasm32"))]
    CAPTURED.with(|c| c.borrow_mut().push((level, message.to_owned())));
}

/// Writes a debug line.
///
/// ```
/// tidegate_plugin::log::debug("details");
/// ```
pub fn debug(message: &str) {
    write(Level::Debug, message)
}

/// Writes an info line.
///
/// ```
/// tidegate_plugin::log::info("configured");
/// ```
pub fn info(message: &str) {
    write(Level::Info, message)
}

/// Writes a warning.
///
/// ```
/// tidegate_plugin::log::warn("odd value, ignored");
/// ```
pub fn warn(message: &str) {
    write(Level::Warn, message)
}

/// Writes an error line.
///
/// ```
/// tidegate_plugin::log::error("cannot do that");
/// ```
pub fn error(message: &str) {
    write(Level::Error, message)
}

#[cfg(not(target_arch = "wasm32"))]
thread_local! {
    static CAPTURED: std::cell::RefCell<Vec<(Level, String)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Natively: the lines this thread logged since the last call, oldest first. (In the wasm
/// guest lines go straight to the host and this is always empty.)
///
/// ```
/// use tidegate_plugin::log;
/// log::warn("x");
/// assert_eq!(log::captured().len(), 1);
/// assert!(log::captured().is_empty());
/// ```
pub fn captured() -> Vec<(Level, String)> {
    #[cfg(not(target_arch = "wasm32"))]
    return CAPTURED.with(|c| std::mem::take(&mut *c.borrow_mut()));
    #[cfg(target_arch = "wasm32")]
    Vec::new()
}
