//! The errors that stop tidegate (or one of its pipelines), each naming what is at fault.
//!
//! Errors that concern a single event never appear here: a plugin failing on an event sends
//! that event to the dead-letter subject and the pipeline goes on.

use std::path::PathBuf;

/// Why tidegate cannot start or a pipeline had to stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration file is unreadable or invalid.
    #[error("config {path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the key.
        message: String,
    },
    /// A plugin file is missing, is not a component, targets the wrong world, or refused its
    /// configuration.
    #[error("plugin '{name}' ({path}): {message}")]
    Plugin {
        /// The plugin's name in the config.
        name: String,
        /// The file it was loaded from.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Something every pipeline needs could not be set up (the wasm engine, the NATS client).
    #[error("{message}")]
    Startup {
        /// What failed.
        message: String,
    },
    /// MongoDB refused or lost the change stream in a way a resume cannot fix.
    #[error("pipeline '{pipeline}': MongoDB: {message}")]
    Source {
        /// The pipeline.
        pipeline: String,
        /// What happened.
        message: String,
    },
    /// NATS or JetStream refused something that retrying cannot fix (for example a stream
    /// whose configuration makes deduplication impossible).
    #[error("pipeline '{pipeline}': NATS: {message}")]
    Sink {
        /// The pipeline.
        pipeline: String,
        /// What happened.
        message: String,
    },
    /// The checkpoint could not be read or written.
    #[error("pipeline '{pipeline}': checkpoint: {message}")]
    Checkpoint {
        /// The pipeline.
        pipeline: String,
        /// What happened.
        message: String,
    },
    /// A stop (SIGTERM, SIGINT) did not drain within `shutdown_timeout_secs`; what was left
    /// is read again on restart.
    #[error("pipeline '{pipeline}': shutdown: {message}")]
    Shutdown {
        /// The pipeline.
        pipeline: String,
        /// What was left.
        message: String,
    },
    /// Another instance owns the pipeline now (high availability): this one must stop
    /// writing for it. Not a failure of the process; the pipeline goes back to standby.
    #[error("pipeline '{pipeline}': fenced: {message}")]
    Fenced {
        /// The pipeline.
        pipeline: String,
        /// How it was found out.
        message: String,
    },
}
