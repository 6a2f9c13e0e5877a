//! tidegate relays MongoDB change streams through WebAssembly plugins into NATS JetStream,
//! losing nothing and duplicating nothing across restarts.
//!
//! # Layout
//!
//! The folders follow an event from left to right, with the parts that keep it safe beside
//! them. Each top-level module is one component; they depend on each other only downwards in
//! this list's order (no import cycle), so any one can be read with what it builds on.
//!
//! ```text
//!            ┌────────────── runtime: one process, every unit, shutdown ───────────────┐
//!            │  ha: leases and fences around each unit                                 │
//!            │  ┌──────────── pipeline: one unit, stages wired ──────────────────────┐ │
//!  MongoDB ──┼─▶│ source ──▶ plugin chain ──▶ sink (framer ▶ publisher) ──▶ JetStream │ │
//!            │  │            (sandbox)                          └──▶ checkpoint       │ │
//!            │  └────────────────────────────────────────────────────────────────────┘ │
//!            └── ops: metrics, logs, oplog headroom, HTTP ─────────────────────────────┘
//! ```
//!
//! - [`model`] — what travels: the change event as the server's raw BSON, resume tokens,
//!   the durable position, subjects and document-key tokens, and Extended JSON written from
//!   raw BSON.
//! - [`error`] — the errors that stop tidegate or a unit, each naming what is at fault.
//! - [`security`] — NATS authentication and TLS, MongoDB client defaults, and secrets
//!   scrubbed from every output.
//! - [`config`] — the TOML file: every section's keys, defaults and validation (every
//!   problem reported at once), environment overrides, tenants expanded into units, and the
//!   files it names (a CSV capture list, plugins' config files).
//! - [`ops`] — what an operator sees: metrics, logs, the oplog headroom watch and the HTTP
//!   endpoint (health, readiness, Prometheus, `/status` and its page).
//! - [`ha`] — high availability: leases in NATS KV that run a unit while held (one lease
//!   for all the tenants of a pipeline with a shared reader), and the fence that stops a
//!   former owner writing.
//! - [`sandbox`] — the wasmtime engine, compiled-plugin cache, instance admission, the
//!   limits and capabilities of every plugin call, and the worker pool every unit's plugin
//!   calls run on (fair across units, heavy ones in the background).
//! - [`plugin`] — the WIT contract's bindings (one module per version, 0.1 and 0.2), loading
//!   components, running a chain over an event (plugins of both versions in one chain), 0.2's
//!   path reads and edits on the raw BSON, quarantine, hot reload.
//! - [`source`] — the change stream: opening and resuming it, server-side filters, start
//!   positions, heartbeats, fatal vs. transient errors, events over 16 MiB, snapshots and the
//!   signals that start them.
//! - [`sink`] — the JetStream side: framing verdicts into messages that fit the server
//!   (routing headers included), payload formats and encodings, stream preparation, the
//!   ordered and deduplicated publisher, and (`sink::shared`) one publisher for a stream a
//!   pipeline's tenants share.
//! - [`checkpoint`] — saving the acknowledged position (NATS KV or MongoDB), at a pace
//!   of writes a pipeline's tenants share.
//! - [`pipeline`] — one unit (a pipeline, or one tenant's share of it): source, chain and
//!   sink wired with bounded queues, its quota's throttle, its start position, draining and
//!   shutdown; and the shared reader (`pipeline::shared`): one change stream per tenanted
//!   pipeline, routed to its tenants, each detaching to a catch-up stream of its own and
//!   rejoining; an attached tenant's chain stage reads the router's channel (its lane,
//!   counted in events: `pipeline::shared::channel`) directly (`pipeline::inlet`).
//! - [`admin`] — the admin API (tenants and plugins managed at run time, with operator and
//!   tenant tokens), the tenant records and plugin components it keeps in NATS, and the
//!   checks a pushed plugin passes before it is accepted.
//! - `runtime` — the process: one sandbox and one NATS connection for every unit, units run
//!   alone or under leases, the tenants of the admin API's bucket started and stopped as it
//!   changes, supervision and shutdown ([`run`]).
//!
//! The binary (`src/main.rs`) parses the command line, installs signal handlers and calls
//! [`run`]; the plugin author's tools (`tidegate plugin new | inspect | test`) are its
//! `plugin_cli` module, `tidegate tail PIPELINE` (a pipeline's messages as they are
//! stored) its `tail` module, and `tidegate tenant …` / `tidegate plugin push` (the admin
//! API from the command line) its `admin_cli` module. Integration tests are in `host/tests/` (real servers, started by the
//! `tidegate-testkit` crate), the benchmark in `host/benches/`.

#![deny(missing_docs)]

pub mod admin;
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
