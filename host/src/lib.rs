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
pub mod ejson;
pub mod encode;
pub mod error;
pub mod event;
pub mod fence;
pub mod http;
pub mod lease;
pub mod metrics;
pub mod oplog;
pub mod oversize;
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
/// Tenants are isolated from each other: every unit loads its plugins on a thread of its own,
/// all at once, and a tenant starts as soon as its own chain is loaded, whatever the others'
/// `init` is doing. A tenant whose plugins do not load is held (it reads nothing and keeps
/// its checkpoint until a working plugin appears), and a tenant unit that fails stops alone,
/// while the others carry on. A pipeline without tenants whose plugins do not load stops
/// start-up.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let sandbox = std::sync::Arc::new(new_sandbox(&config)?);
    let loads: Vec<_> = config
        .pipelines
        .iter()
        .map(|pipeline| {
            let (sandbox, pipeline, plugin_dir) =
                (sandbox.clone(), pipeline.clone(), config.plugin_dir.clone());
            tokio::task::spawn_blocking(move || {
                plugin::Chain::load(&sandbox, &pipeline, &plugin_dir)
            })
        })
        .collect();
    // Pipelines without tenants must load before anything starts (their failure is fatal);
    // tenants' loads carry on meanwhile, and each tenant's unit waits for its own.
    let mut chains = Vec::new();
    for (pipeline, load) in config.pipelines.iter().zip(loads) {
        chains.push(match pipeline.tenant {
            Some(_) => UnitChain::Loading(load),
            None => UnitChain::Loaded(Some(loaded_chain(&pipeline.id, load).await?)),
        });
    }

    // The latest connection failure, for the "waiting for NATS" line.
    let nats_failure = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
    // Credentials in the URL are passed as options: the client ignores them in URLs.
    let urls = security::parse_nats_urls(&config.nats.url)
        .map_err(|message| Error::Startup { message })?;
    let nats = security::nats_options(
        &config.nats.auth,
        urls.credentials.as_ref(),
        config.nats.tls.as_ref(),
    )
    .await?
    .retry_on_initial_connect()
    .event_callback({
        // When the connection was lost, while it is: a disconnect and the reconnect are
        // logged once each, the reconnect with how long NATS was away.
        let lost_at = std::sync::Arc::new(std::sync::Mutex::new(None::<std::time::Instant>));
        let failure = nats_failure.clone();
        move |event| {
            let lost_at = lost_at.clone();
            let failure = failure.clone();
            async move {
                let Ok(mut lost_at) = lost_at.lock() else {
                    return;
                };
                match event {
                    async_nats::Event::Disconnected => {
                        if lost_at.is_none() {
                            *lost_at = Some(std::time::Instant::now());
                            tracing::warn!("NATS disconnected; reconnecting (publishing and NATS checkpoints wait)");
                        }
                    }
                    async_nats::Event::Connected => match lost_at.take() {
                        Some(since) => tracing::info!(
                            away_ms = since.elapsed().as_millis() as u64,
                            "NATS reconnected after {:.1} s",
                            since.elapsed().as_secs_f64()
                        ),
                        None => tracing::info!("NATS connected"),
                    },
                    async_nats::Event::ClientError(err) => {
                        let text = security::scrub(&err.to_string()).into_owned();
                        tracing::debug!(error = %text, "NATS client error");
                        let text = text.trim_start_matches("nats: ").to_string();
                        *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(text);
                    }
                    async_nats::Event::ServerError(err) => {
                        let text = security::scrub(&err.to_string()).into_owned();
                        tracing::debug!(error = %text, "NATS server error");
                        *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(text);
                    }
                    other => tracing::info!("NATS event: {}", security::scrub(&other.to_string())),
                }
            }
        }
    })
    // One address per server: the client does not split a comma-separated string.
    .connect(&urls.servers)
    .await
    .map_err(|err| Error::Startup {
        message: format!(
            "cannot connect to NATS: {}",
            security::scrub(&err.to_string())
        ),
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
                servers = %urls.servers.join(","),
                "waiting for NATS: {}",
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
        let held = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(matches!(
            chain,
            UnitChain::Loading(_)
        )));
        handles.push(reload::UnitHandle::new(
            pipeline.clone(),
            &config.plugin_dir,
            updates_tx,
            held.clone(),
        ));
        let is_tenant = pipeline.tenant.is_some();
        let (ha, js, stop_rx) = (ha.clone(), js.clone(), stop_rx.clone());
        let (sandbox, plugin_dir) = (sandbox.clone(), config.plugin_dir.clone());
        tasks.spawn(async move {
            let id = pipeline.id.clone();
            let chain = chain.wait(&id, &held).await;
            let result = match ha {
                Some(ha) => {
                    let plugins = lease::UnitPlugins {
                        chain,
                        updates,
                        sandbox,
                        plugin_dir,
                    };
                    ha.run_pipeline(pipeline, plugins, js, stop_rx).await
                }
                None => {
                    pipeline::run(pipeline, chain, updates, js, stop_rx, fence::Fence::none()).await
                }
            };
            (is_tenant, recorded(&id, result))
        });
    }
    let reloader = tokio::spawn(reload::run(
        sandbox.clone(),
        config.clone(),
        handles,
        stop_rx.clone(),
    ));

    let mut outcome = Ok(());
    let mut stopping = false;
    // Each unit stops itself within its `shutdown_timeout_secs`; this backstop also bounds
    // what comes after (releasing leases) should NATS not answer.
    let backstop = std::time::Duration::from_secs(
        config
            .pipelines
            .iter()
            .map(|p| p.shutdown_timeout_secs)
            .max()
            .unwrap_or(30)
            + 10,
    );
    // Armed when stopping begins.
    let stop_by = tokio::time::sleep(std::time::Duration::from_secs(365 * 24 * 3600));
    tokio::pin!(stop_by);
    while !tasks.is_empty() {
        tokio::select! {
            _ = &mut shutdown, if !stopping => {
                stopping = true;
                stop_by.as_mut().reset(tokio::time::Instant::now() + backstop);
                let _ = stop_tx.send(true);
            }
            () = &mut stop_by, if stopping => {
                tracing::error!(units = tasks.len(), "units still stopping after {} s; exiting without them", backstop.as_secs());
                if outcome.is_ok() {
                    outcome = Err(Error::Startup {
                        message: format!("{} units did not stop within {} s", tasks.len(), backstop.as_secs()),
                    });
                }
                break;
            }
            Some(done) = tasks.join_next() => {
                let (is_tenant, result) = done.unwrap_or_else(|err| (false, Err(Error::Startup {
                    message: format!("pipeline task failed: {err}"),
                })));
                if let Err(err) = result {
                    if is_tenant && !stopping && !tasks.is_empty() {
                        tracing::error!(error = %err, "tenant unit stopped; the other units carry on");
                    } else if stopping {
                        tracing::error!(error = %err, "pipeline stopped with an error");
                    } else {
                        // The first failure is returned (and printed once, by the caller);
                        // a later one would not be, so it is logged here.
                        if outcome.is_err() {
                            tracing::error!(error = %err, "another pipeline failed too");
                        } else if !tasks.is_empty() {
                            tracing::info!("a pipeline failed; stopping the others");
                        }
                        stopping = true;
                        stop_by.as_mut().reset(tokio::time::Instant::now() + backstop);
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
    tasks.abort_all();
    let _ = reloader.await;
    // Bounded: NATS may be away.
    match tokio::time::timeout(std::time::Duration::from_secs(2), nats.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::warn!(error = %err, "final NATS flush failed"),
        Err(_) => tracing::warn!("final NATS flush timed out (NATS away)"),
    }
    outcome
}

/// A unit's plugin chain at start-up.
enum UnitChain {
    /// Loaded (`None`: a tenant held).
    Loaded(Option<plugin::Chain>),
    /// A tenant's, still loading on its own thread.
    Loading(tokio::task::JoinHandle<Result<plugin::Chain, Error>>),
}

impl UnitChain {
    /// The chain once loaded, or `None` (logged) for a tenant whose plugins do not load;
    /// clears `held` when it loaded.
    async fn wait(self, unit: &str, held: &std::sync::atomic::AtomicBool) -> Option<plugin::Chain> {
        let load = match self {
            UnitChain::Loaded(chain) => return chain,
            UnitChain::Loading(load) => load,
        };
        match loaded_chain(unit, load).await {
            Ok(chain) => {
                held.store(false, std::sync::atomic::Ordering::Release);
                Some(chain)
            }
            Err(err) => {
                tracing::error!(pipeline = %unit, "tenant held until its plugins load: {err}");
                None
            }
        }
    }
}

/// The outcome of a unit's start-up load, logged and recorded in its metrics when it loaded.
async fn loaded_chain(
    unit: &str,
    load: tokio::task::JoinHandle<Result<plugin::Chain, Error>>,
) -> Result<plugin::Chain, Error> {
    let chain = load.await.unwrap_or_else(|err| {
        Err(Error::Startup {
            message: format!("{unit}: plugin loader failed: {err}"),
        })
    })?;
    let plugins: Vec<String> = chain
        .plugins()
        .iter()
        .map(|p| format!("{}({:?})", p.name(), p.world()))
        .collect();
    tracing::info!(pipeline = %unit, plugins = %plugins.join(" → "), "plugins loaded");
    metrics::pipeline(unit).set_plugins(metrics::plugin_infos(&chain));
    Ok(chain)
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
