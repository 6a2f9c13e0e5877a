//! Operations: what an operator sees of a running tidegate — metrics, logs, the oplog
//! headroom check, and the HTTP endpoint that serves them.

pub mod http;
pub mod metrics;
pub mod oplog;
pub mod telemetry;
