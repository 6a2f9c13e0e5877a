//! tidegate relays MongoDB change streams through WebAssembly plugins into NATS JetStream,
//! losing nothing and duplicating nothing across restarts.
//!
//! # Layout
//!
//! An event travels left to right; each box is one module with one job.
//!
//! ```text
//!  source ──▶ plugin::Chain ──▶ pipeline::Framer ──▶ sink::Publisher ──▶ JetStream
//!  (MongoDB)  (wasm, sandbox)   (encode: subject,    (ordered, windowed,     │
//!                                 ids, payload)        acked)               ▼
//!                                                                      checkpoint
//! ```
//!
//! - [`config`] — the TOML file: every key, its default, its validation; tenants become
//!   units of their own here.
//! - [`source`] — the change stream: open, resume, heartbeat, fatal vs. transient errors,
//!   start positions, invalidate and lost-history policies.
//! - [`oversize`] — events over MongoDB's 16 MiB limit: the stage that splits or strips
//!   them, reassembling split events, and the error that names one.
//! - [`snapshot`] — reading existing documents in resumable chunks: before streaming
//!   (initial), or on a signal while streaming (incremental, between watermarks).
//! - [`event`] — the change as tidegate carries it (the server's raw BSON event, resume
//!   token).
//! - [`ejson`] — Extended JSON written straight from raw BSON (payloads, the plugin
//!   boundary), and plugin output read back into raw BSON.
//! - [`signal`] — Debezium-style signal documents read into requests, or refused with a reason.
//! - [`plugin`] — loading components, the WIT bindings, running a chain over an event,
//!   quarantine.
//! - [`sandbox`] — the wasmtime engine, compiled-plugin cache, instance admission, and the
//!   limits and capabilities of every plugin call.
//! - [`reload`] — hot reload of changed plugin files, and SIGHUP.
//! - [`security`] — NATS authentication (including credentials in `nats.url`) and TLS,
//!   MongoDB defaults, secrets and scrubbing them from every output.
//! - [`encode`] — subjects and payload encodings.
//! - [`sink`] — the JetStream stream check and the ordered, deduplicated publisher.
//! - [`checkpoint`] — saving the acknowledged position (NATS KV or MongoDB).
//! - [`http`] — the operations endpoint: health, readiness, metrics, status and its page.
//! - [`fence`] — whether this process may still write for a pipeline.
//! - [`lease`] — high availability: pipelines shared between instances through NATS KV leases.
//! - [`pipeline`] — wiring one pipeline's stages together, shutdown and draining.
//! - [`telemetry`] — logs (credential-printing client libraries held at `info`, every line
//!   scrubbed of secrets), and the snapshot progress bar on a terminal.
//! - [`oplog`] — how long each checkpoint would survive in the oplog: its capacity, write
//!   rate and projected headroom, and the warnings about it.
//! - [`metrics`] — every counter, gauge and histogram, rendered for Prometheus and `/status`.
//!
//! The binary (`src/main.rs`) parses the command line, installs signal handlers and calls
//! [`run`]; the plugin author's tools (`tidegate plugin new | inspect | test`) are its
//! `plugin_cli` module.

#![deny(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod ha;
pub mod model;
pub mod ops;
pub mod pipeline;
pub mod plugin;
mod runtime;
pub mod sandbox;
pub mod security;
pub mod sink;
pub mod source;

pub use config::Config;
pub use error::Error;
pub use runtime::{load_chains, new_sandbox, run};
