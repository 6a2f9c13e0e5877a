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
//! - [`snapshot`] — reading existing documents in resumable chunks: before streaming
//!   (initial), or on a signal while streaming (incremental, between watermarks).
//! - [`signal`] — Debezium-style signal documents read into requests, or refused with a reason.
//! - [`event`] — the change as tidegate carries it (BSON documents, resume token).
//! - [`plugin`] — loading components, the WIT bindings, running a chain over an event,
//!   quarantine.
//! - [`sandbox`] — the wasmtime engine, compiled-plugin cache, instance admission, and the
//!   limits and capabilities of every plugin call.
//! - [`reload`] — hot reload of changed plugin files, and SIGHUP.
//! - [`security`] — NATS authentication and TLS, MongoDB defaults, secrets.
//! - [`encode`] — subjects and payload encodings.
//! - [`sink`] — the JetStream stream check and the ordered, deduplicated publisher.
//! - [`checkpoint`] — saving the acknowledged position (NATS KV or MongoDB).
//! - [`http`] — the operations endpoint: health, readiness, metrics, status and its page.
//! - [`fence`] — whether this process may still write for a pipeline.
//! - [`lease`] — high availability: pipelines shared between instances through NATS KV leases.
//! - [`pipeline`] — wiring one pipeline's stages together, shutdown and draining.
//! - [`telemetry`] — logs, and the snapshot progress bar on a terminal.
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
pub mod encode;
pub mod error;
pub mod event;
pub mod fence;
pub mod http;
pub mod lease;
pub mod metrics;
pub mod oplog;
pub mod pipeline;
pub mod plugin;
pub mod reload;
pub mod sandbox;
pub mod security;
pub mod signal;
pub mod sink;
pub mod snapshot;
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
    // `run` loads them itself, to hold tenants whose plugins fail instead of refusing all.
    config
        .pipelines
        .iter()
        .map(|p| plugin::Chain::load(sandbox, p, &config.plugin_dir))
        .collect()
}

/// Creates the shared sandbox for `config`.
pub fn new_sandbox(config: &Config) -> Result<sandbox::Sandbox, Error> {
    sandbox::Sandbox::new(&config.sandbox, config.largest_memory_mib())
        .map_err(|message| Error::Startup { message })
}

/// Runs every pipeline of `config` until `shutdown` resolves (then drains in-flight messages,
/// checkpoints and returns `Ok`) or a pipeline fails (then stops the others the same way and
/// returns its error).
///
/// Tenants are isolated from each other: a tenant whose plugins do not load is held (it
/// reads nothing and keeps its checkpoint until a working plugin appears), and a tenant
/// unit that fails stops alone, while the others carry on.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let sandbox = std::sync::Arc::new(new_sandbox(&config)?);
    let mut chains = Vec::new();
    for pipeline in &config.pipelines {
        match plugin::Chain::load(&sandbox, pipeline, &config.plugin_dir) {
            Ok(chain) => {
                let plugins: Vec<String> = chain
                    .plugins()
                    .iter()
                    .map(|p| format!("{}({:?})", p.name(), p.world()))
                    .collect();
                tracing::info!(pipeline = %pipeline.id, plugins = %plugins.join(" → "), "plugins loaded");
                metrics::pipeline(&pipeline.id).set_plugins(metrics::plugin_infos(&chain));
                chains.push(Some(chain));
            }
            Err(err) if pipeline.tenant.is_some() => {
                tracing::error!(pipeline = %pipeline.id, "tenant held until its plugins load: {err}");
                chains.push(None);
            }
            Err(err) => return Err(err),
        }
    }

    // The latest connection failure, for the "waiting for NATS" line.
    let nats_failure = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
    let failure = nats_failure.clone();
    let nats = security::nats_options(&config.nats.auth, config.nats.tls.as_ref())
        .await?
        .retry_on_initial_connect()
        .event_callback(move |event| {
            let failure = failure.clone();
            async move {
                match event {
                    async_nats::Event::Disconnected => {
                        tracing::warn!("NATS disconnected; reconnecting")
                    }
                    async_nats::Event::Connected => tracing::info!("NATS connected"),
                    async_nats::Event::ClientError(err) => {
                        tracing::debug!("NATS client error: {err}");
                        let text = err.to_string();
                        let text = text.trim_start_matches("nats: ").to_string();
                        *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(text);
                    }
                    async_nats::Event::ServerError(err) => {
                        tracing::debug!("NATS server error: {err}");
                        *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(err.to_string());
                    }
                    other => tracing::debug!("NATS event: {other}"),
                }
            }
        })
        .connect(config.nats.url.as_str())
        .await
        .map_err(|err| Error::Startup {
            message: format!("cannot connect to NATS: {err}"),
        })?;
    let _http = match &config.http {
        Some(http) => Some(AbortOnDrop(tokio::spawn(http::serve(
            http::bind(http).await?,
            nats.clone(),
        )))),
        None => None,
    };
    // The oplog headroom: metrics, `/readyz`, and warnings before a position falls out.
    let (_oplog_stop, oplog_stopped) = watch::channel(false);
    for pipeline in &config.pipelines {
        tokio::spawn(oplog::watch_headroom(
            pipeline.clone(),
            oplog_stopped.clone(),
        ));
    }
    let ack_timeout = std::time::Duration::from_millis(config.nats.ack_timeout_ms);
    let max_in_flight = config
        .pipelines
        .iter()
        .map(|p| p.sink.max_in_flight)
        .sum::<usize>();
    // Each pipeline bounds its own window; the client's limit only has to leave room for a
    // full re-publish while the abandoned acks of the previous attempt are still held
    // (for up to the ack timeout) by the client's acker.
    let js = async_nats::jetstream::context::ContextBuilder::new()
        .timeout(ack_timeout)
        .ack_timeout(ack_timeout)
        .max_ack_inflight(2 * max_in_flight + 16)
        .backpressure_on_inflight(true)
        .build(nats.clone());

    tokio::pin!(shutdown);
    // The client connects in the background (and keeps reconnecting); pipelines need it up
    // to check their streams, so wait here, saying so, rather than fail on a NATS that is
    // merely not up yet.
    let mut waited = 0;
    while nats.connection_state() != async_nats::connection::State::Connected {
        if waited % 500 == 100 {
            let failure = nats_failure
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            tracing::warn!(
                "waiting for NATS at {}: {}",
                redact_url(&config.nats.url),
                nats_connect_hint(failure.as_deref())
            );
        }
        waited += 1;
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tokio::time::sleep(std::time::Duration::from_millis(10)) => {}
        }
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let ha = match config.ha.enabled {
        true => Some(lease::Coordinator::open(&js, &config.ha, config.pipelines.len()).await?),
        false => None,
    };
    if let Some(ha) = &ha {
        let presence = ha.clone().run_presence(stop_rx.clone());
        tasks.spawn(async move { (false, presence.await) });
    }
    let mut handles = Vec::new();
    for (pipeline, chain) in config.pipelines.iter().cloned().zip(chains) {
        let (updates_tx, updates_rx) = tokio::sync::mpsc::unbounded_channel();
        let updates = std::sync::Arc::new(tokio::sync::Mutex::new(updates_rx));
        handles.push(reload::UnitHandle::new(
            pipeline.clone(),
            &config.plugin_dir,
            updates_tx,
            chain.is_none(),
        ));
        let is_tenant = pipeline.tenant.is_some();
        match &ha {
            Some(ha) => {
                let plugins = lease::UnitPlugins {
                    chain,
                    updates,
                    sandbox: sandbox.clone(),
                    plugin_dir: config.plugin_dir.clone(),
                };
                let id = pipeline.id.clone();
                let run = ha
                    .clone()
                    .run_pipeline(pipeline, plugins, js.clone(), stop_rx.clone());
                tasks.spawn(async move { (is_tenant, recorded(&id, run.await)) });
            }
            None => {
                let id = pipeline.id.clone();
                let run = pipeline::run(
                    pipeline,
                    chain,
                    updates,
                    js.clone(),
                    stop_rx.clone(),
                    fence::Fence::none(),
                );
                tasks.spawn(async move { (is_tenant, recorded(&id, run.await)) });
            }
        };
    }
    let reloader = tokio::spawn(reload::run(
        sandbox.clone(),
        config.clone(),
        handles,
        stop_rx.clone(),
    ));

    let mut outcome = Ok(());
    let mut stopping = false;
    while !tasks.is_empty() {
        tokio::select! {
            _ = &mut shutdown, if !stopping => {
                stopping = true;
                let _ = stop_tx.send(true);
            }
            Some(done) = tasks.join_next() => {
                let (is_tenant, result) = done.unwrap_or_else(|err| (false, Err(Error::Startup {
                    message: format!("pipeline task failed: {err}"),
                })));
                if let Err(err) = result {
                    if is_tenant && !stopping && !tasks.is_empty() {
                        tracing::error!(error = %err, "tenant unit stopped; the other units carry on");
                    } else {
                        // The first failure is returned (and printed once, by the caller);
                        // a later one would not be, so it is logged here.
                        if outcome.is_err() {
                            tracing::error!(error = %err, "another pipeline failed too");
                        } else if !tasks.is_empty() {
                            tracing::info!("a pipeline failed; stopping the others");
                        }
                        stopping = true;
                        let _ = stop_tx.send(true);
                    }
                    if outcome.is_ok() {
                        outcome = Err(err);
                    }
                }
            }
        }
    }
    let _ = stop_tx.send(true);
    let _ = reloader.await;
    if let Err(err) = nats.flush().await {
        tracing::warn!(error = %err, "final NATS flush failed");
    }
    outcome
}

/// Records a unit's failure as its last error (for `/status`) and marks it stopped.
fn recorded(unit: &str, result: Result<(), Error>) -> Result<(), Error> {
    if let Err(err) = &result {
        let series = metrics::pipeline(unit);
        series.set_error(&err.to_string());
        series.set_state(metrics::State::Stopped);
    }
    result
}

/// Stops a background task when dropped (whichever way `run` returns).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a NATS connection failure (the client's words) most likely means, and what to do.
fn nats_connect_hint(failure: Option<&str>) -> String {
    let Some(failure) = failure else {
        return "no answer yet".into();
    };
    let lower = failure.to_ascii_lowercase();
    let hint = if lower.contains("authorization") || lower.contains("authentication") {
        "the server refused the credentials; check [nats.auth] (user/password, token, nkey or \
         credentials file)"
    } else if lower.contains("tls") {
        "TLS failed: the server may require TLS (use a tls:// URL and [nats.tls]) or its \
         certificate is not trusted (nats.tls.ca_file)"
    } else if lower.contains("dns") {
        "the host name does not resolve; check nats.url"
    } else if lower.contains("io error") || lower.contains("timed out") || lower.contains("parse") {
        "nothing that speaks NATS answers there; check the host and port in nats.url (the \
         client port, 4222 by default, not the monitoring port) and that nats-server runs"
    } else {
        "retrying"
    };
    format!("{failure}: {hint}")
}

/// A URL with any `user:password@` or `token@` part removed, for logs.
fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|one| match (one.find("://"), one.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}***@{}", &one[..scheme + 3], &one[at + 1..])
            }
            _ => one.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    /// Credentials in NATS URLs never reach the log.
    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact_url("nats://u:p@h:4222"), "nats://***@h:4222");
        assert_eq!(
            redact_url("nats://h:4222,tls://t@g"),
            "nats://h:4222,tls://***@g"
        );
    }
}
