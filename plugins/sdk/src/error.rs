//! Typed plugin errors: what the host dead-letters an event with.

use std::fmt;

/// Why a plugin could not handle an event (or start).
///
/// Any error returned from [`Filter::filter`](crate::Filter::filter) or
/// [`Transform::transform`](crate::Transform::transform) sends the *original* event to the
/// pipeline's dead-letter subject, with the message in its `Tidegate-Error` header; the pipeline
/// carries on. Returned from `init`, it stops tidegate from starting and names the plugin.
///
/// ```
/// use tidegate_plugin::Error;
///
/// let err = Error::invalid_event("`fullDocument.total` is missing");
/// assert_eq!(err.to_string(), "invalid-event: `fullDocument.total` is missing");
/// assert!(matches!(err, Error::InvalidEvent(_)));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The event is not one this plugin can handle (missing field, wrong type, …).
    InvalidEvent(String),
    /// The plugin's configuration is wrong.
    InvalidConfig(String),
    /// Anything else went wrong.
    Failed(String),
}

impl Error {
    /// An [`Error::InvalidEvent`].
    ///
    /// ```
    /// # use tidegate_plugin::Error;
    /// assert_eq!(Error::invalid_event("no id"), Error::InvalidEvent("no id".into()));
    /// ```
    pub fn invalid_event(message: impl fmt::Display) -> Error {
        Error::InvalidEvent(message.to_string())
    }

    /// An [`Error::InvalidConfig`].
    ///
    /// ```
    /// # use tidegate_plugin::Error;
    /// assert_eq!(Error::invalid_config("bad"), Error::InvalidConfig("bad".into()));
    /// ```
    pub fn invalid_config(message: impl fmt::Display) -> Error {
        Error::InvalidConfig(message.to_string())
    }

    /// An [`Error::Failed`].
    ///
    /// ```
    /// # use tidegate_plugin::Error;
    /// assert_eq!(Error::failed("boom"), Error::Failed("boom".into()));
    /// ```
    pub fn failed(message: impl fmt::Display) -> Error {
        Error::Failed(message.to_string())
    }

    /// The message without its kind.
    ///
    /// ```
    /// # use tidegate_plugin::Error;
    /// assert_eq!(Error::failed("boom").message(), "boom");
    /// ```
    pub fn message(&self) -> &str {
        match self {
            Error::InvalidEvent(m) | Error::InvalidConfig(m) | Error::Failed(m) => m,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self {
            Error::InvalidEvent(_) => "invalid-event",
            Error::InvalidConfig(_) => "invalid-config",
            Error::Failed(_) => "failed",
        };
        write!(f, "{kind}: {}", self.message())
    }
}

impl std::error::Error for Error {}

/// A plugin's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
