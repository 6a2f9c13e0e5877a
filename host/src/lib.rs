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
//! - [`config`] — the TOML file: every key, its default, its validation.
//! - [`source`] — the change stream: open, resume, heartbeat, fatal vs. transient errors.
//! - [`event`] — the change as tidegate carries it (BSON documents, resume token).
//! - [`plugin`] — loading components, the WIT bindings, running a chain over an event.
//! - [`sandbox`] — the wasmtime engine and the limits of every plugin call.
//! - [`encode`] — subjects and payload encodings.
//! - [`sink`] — the JetStream stream check and the ordered, deduplicated publisher.
//! - [`checkpoint`] — saving the acknowledged position (NATS KV or MongoDB).
//! - [`pipeline`] — wiring one pipeline's stages together, shutdown and draining.
//! - [`telemetry`] — logs and counters.
//!
//! The binary (`src/main.rs`) only parses the command line, installs signal handlers and
//! calls [`run`].

#![deny(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod encode;
pub mod error;
pub mod event;
pub mod pipeline;
pub mod plugin;
pub mod sandbox;
pub mod sink;
pub mod source;
pub mod telemetry;

use std::future::Future;

use tokio::sync::watch;

pub use config::Config;
pub use error::Error;

/// Loads every pipeline's plugins, checking each against the contract. Used by `run` and
/// by `tidegate check`.
pub fn load_chains(
    config: &Config,
    sandbox: &sandbox::Sandbox,
) -> Result<Vec<plugin::Chain>, Error> {
    config
        .pipelines
        .iter()
        .map(|p| plugin::Chain::load(sandbox, p, &config.plugin_dir))
        .collect()
}

/// Runs every pipeline of `config` until `shutdown` resolves (then drains in-flight messages,
/// checkpoints and returns `Ok`) or a pipeline fails (then stops the others the same way and
/// returns its error).
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let sandbox = sandbox::Sandbox::new().map_err(|message| Error::Config {
        path: "<engine>".into(),
        message,
    })?;
    let chains = load_chains(&config, &sandbox)?;
    for (pipeline, chain) in config.pipelines.iter().zip(&chains) {
        let plugins: Vec<String> = chain
            .plugins()
            .iter()
            .map(|p| format!("{}({:?})", p.name(), p.world()))
            .collect();
        tracing::info!(pipeline = %pipeline.id, plugins = %plugins.join(" → "), "plugins loaded");
    }

    let first_pipeline = config
        .pipelines
        .first()
        .map(|p| p.id.clone())
        .unwrap_or_default();
    let nats_error = |message: String| Error::Sink {
        pipeline: first_pipeline.clone(),
        message,
    };
    let nats = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Disconnected => {
                    tracing::warn!("NATS disconnected; reconnecting")
                }
                async_nats::Event::Connected => tracing::info!("NATS connected"),
                other => tracing::debug!("NATS event: {other}"),
            }
        })
        .connect(config.nats.url.as_str())
        .await
        .map_err(|err| nats_error(format!("cannot connect to NATS: {err}")))?;
    let ack_timeout = std::time::Duration::from_millis(config.nats.ack_timeout_ms);
    let max_in_flight = config
        .pipelines
        .iter()
        .map(|p| p.sink.max_in_flight)
        .sum::<usize>();
    let js = async_nats::jetstream::context::ContextBuilder::new()
        .timeout(ack_timeout)
        .max_ack_inflight(max_in_flight + 16)
        .backpressure_on_inflight(true)
        .build(nats.clone());

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for (pipeline, chain) in config.pipelines.iter().cloned().zip(chains) {
        tasks.spawn(pipeline::run(pipeline, chain, js.clone(), stop_rx.clone()));
    }

    tokio::pin!(shutdown);
    let mut outcome = Ok(());
    let mut stopping = false;
    while !tasks.is_empty() {
        tokio::select! {
            _ = &mut shutdown, if !stopping => {
                stopping = true;
                let _ = stop_tx.send(true);
            }
            Some(done) = tasks.join_next() => {
                let result = done.unwrap_or_else(|err| Err(nats_error(format!("pipeline task failed: {err}"))));
                if let Err(err) = result {
                    tracing::error!(error = %err, "pipeline failed; stopping the others");
                    if outcome.is_ok() {
                        outcome = Err(err);
                    }
                    stopping = true;
                    let _ = stop_tx.send(true);
                }
            }
        }
    }
    if let Err(err) = nats.flush().await {
        tracing::warn!(error = %err, "final NATS flush failed");
    }
    outcome
}
