//! Units at start-up and while they run: loading each unit's chain on its own (a few at
//! once, see `Sandbox::loading`), running a unit alone or under a high-availability lease, and recording how it ended.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{PipelineConfig, TenantReader};
use crate::error::Error;
use crate::ha::fence::Fence;
use crate::ha::lease::Coordinator;
use crate::ha::shared::SharedTerm;
use crate::ops::metrics;
use crate::pipeline;
use crate::plugin::reload::Updates;
use crate::plugin::Chain;
use crate::sandbox::Sandbox;

/// A unit's plugin chain at start-up.
pub(crate) enum UnitChain {
    /// Loaded (`None`: a tenant held).
    Loaded(Option<Chain>),
    /// A tenant's, still loading (or waiting for a load permit).
    Loading(JoinHandle<Result<Chain, Error>>),
}

impl UnitChain {
    /// Starts loading `pipeline`'s chain, as soon as a load permit is free (see
    /// `Sandbox::loading`): every unit's load is independent of the others', and a slow
    /// `init` delays the queue by its own deadline at most.
    pub(crate) fn load(
        sandbox: &Arc<Sandbox>,
        pipeline: &PipelineConfig,
        plugin_dir: &Path,
    ) -> UnitChain {
        let (sandbox, pipeline, plugin_dir) =
            (sandbox.clone(), pipeline.clone(), plugin_dir.to_path_buf());
        UnitChain::Loading(tokio::spawn(async move {
            load_chain(&sandbox, pipeline, plugin_dir).await
        }))
    }

    /// Waits for a pipeline's chain: its failure stops start-up. Tenants' chains are left
    /// loading (each tenant's unit waits for its own, see [`UnitChain::wait`]).
    pub(crate) async fn required(self, pipeline: &PipelineConfig) -> Result<UnitChain, Error> {
        match (self, &pipeline.tenant) {
            (UnitChain::Loading(load), None) => Ok(UnitChain::Loaded(Some(
                loaded_chain(&pipeline.id, load).await?,
            ))),
            (chain, _) => Ok(chain),
        }
    }

    /// The chain once loaded, or `None` (logged) for a tenant whose plugins do not load;
    /// clears `held` when it loaded.
    async fn wait(self, unit: &str, held: &AtomicBool) -> Option<Chain> {
        let load = match self {
            UnitChain::Loaded(chain) => return chain,
            UnitChain::Loading(load) => load,
        };
        match loaded_chain(unit, load).await {
            Ok(chain) => {
                held.store(false, Ordering::Release);
                Some(chain)
            }
            Err(err) => {
                held_tenant(unit, &err);
                None
            }
        }
    }

    /// Whether the unit starts held (its chain still loading).
    pub(crate) fn is_loading(&self) -> bool {
        matches!(self, UnitChain::Loading(_))
    }
}

/// The outcome of a unit's start-up load, logged and recorded in its metrics when it loaded.
async fn loaded_chain(unit: &str, load: JoinHandle<Result<Chain, Error>>) -> Result<Chain, Error> {
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
    metrics::pipeline(unit).set_plugins(chain.infos());
    Ok(chain)
}

/// Loads `pipeline`'s chain under a load permit (see `Sandbox::loading`).
async fn load_chain(
    sandbox: &Arc<Sandbox>,
    pipeline: PipelineConfig,
    plugin_dir: PathBuf,
) -> Result<Chain, Error> {
    let id = pipeline.id.clone();
    sandbox
        .loading(move |sandbox| Chain::load(sandbox, &pipeline, &plugin_dir))
        .await
        .unwrap_or_else(|message| {
            Err(Error::Startup {
                message: format!("{id}: {message}"),
            })
        })
}

/// What a unit runs with besides its config.
pub(crate) struct UnitContext {
    pub(crate) chain: UnitChain,
    /// Whether the unit is held (its plugins not loaded), for hot reload.
    pub(crate) held: Arc<AtomicBool>,
    pub(crate) updates: Updates,
    pub(crate) sandbox: Arc<Sandbox>,
    pub(crate) plugin_dir: PathBuf,
    pub(crate) js: async_nats::jetstream::Context,
    /// Leases, with high availability on.
    pub(crate) ha: Option<Arc<Coordinator>>,
}

/// Runs one unit until `stop` (alone, or whenever this instance holds its lease), and
/// records how it ended.
pub(crate) async fn run_unit(
    pipeline: PipelineConfig,
    context: UnitContext,
    stop: watch::Receiver<bool>,
) -> Result<(), Error> {
    let id = pipeline.id.clone();
    let UnitContext {
        chain,
        held,
        updates,
        sandbox,
        plugin_dir,
        js,
        ha,
    } = context;
    let chain = chain.wait(&id, &held).await;
    let shared_lease = pipeline
        .tenant
        .as_ref()
        .filter(|_| pipeline.tenant_reader == TenantReader::Shared)
        .map(|tenant| tenant.pipeline.clone());
    let result = match (ha, shared_lease) {
        (None, _) => pipeline::run(pipeline, chain, updates, js, stop.clone(), Fence::none()).await,
        (Some(ha), Some(lease)) => {
            let terms = ha.shared_terms(&lease, stop.clone());
            let context = (updates, js, sandbox, plugin_dir);
            run_shared_terms(pipeline, chain, context, terms, stop).await
        }
        (Some(ha), None) => {
            // The chain of a previous term is gone with its run: later terms load the files
            // as they are then. A tenant whose plugins do not load holds (`pipeline::run`).
            let mut first = Some(chain);
            let term = move |fence: Fence, stop: watch::Receiver<bool>| {
                let chain = first.take();
                let (pipeline, updates, js) = (pipeline.clone(), updates.clone(), js.clone());
                let (sandbox, plugin_dir) = (sandbox.clone(), plugin_dir.clone());
                async move {
                    let chain = match chain {
                        Some(chain) => chain,
                        None => term_chain(&sandbox, &pipeline, &plugin_dir).await?,
                    };
                    pipeline::run(pipeline, chain, updates, js, stop, fence).await
                }
            };
            ha.run_unit(id.clone(), stop, term).await
        }
    };
    recorded(&id, result)
}

/// Runs a tenant unit of a pipeline with a shared reader in every term of the pipeline's
/// lease (see `ha::shared`), until `stop`.
async fn run_shared_terms(
    pipeline: PipelineConfig,
    chain: Option<Chain>,
    (updates, js, sandbox, plugin_dir): (
        Updates,
        async_nats::jetstream::Context,
        Arc<Sandbox>,
        PathBuf,
    ),
    mut terms: watch::Receiver<Option<SharedTerm>>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), Error> {
    let mut first = Some(chain);
    let stats = metrics::pipeline(&pipeline.id);
    loop {
        // Like a unit under its own lease: standby until the pipeline's lease is ours.
        stats.set_state(metrics::State::Standby);
        let term = tokio::select! {
            _ = stop.wait_for(|stop| *stop) => return Ok(()),
            term = terms.wait_for(Option::is_some) => match term {
                Ok(term) => term.clone(),
                Err(_) => return Ok(()),
            },
        };
        let Some(SharedTerm {
            fence,
            stop: term_stop,
            running,
        }) = term
        else {
            continue;
        };
        stats.set_state(metrics::State::Starting);
        let chain = match first.take() {
            Some(chain) => chain,
            None => term_chain(&sandbox, &pipeline, &plugin_dir).await?,
        };
        let (updates, js) = (updates.clone(), js.clone());
        let unit_stop = either(stop.clone(), term_stop);
        let result = pipeline::run(pipeline.clone(), chain, updates, js, unit_stop, fence).await;
        drop(running);
        match result {
            Err(Error::Fenced { .. }) | Ok(()) => {}
            Err(err) => return Err(err),
        }
        if *stop.borrow() {
            return Ok(());
        }
        // The term ends (it stopped the unit): wait for the next one.
        let _ = terms.wait_for(Option::is_none).await;
    }
}

/// A stop signal that turns true when `a` or `b` does.
fn either(mut a: watch::Receiver<bool>, mut b: watch::Receiver<bool>) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(*a.borrow() || *b.borrow());
    tokio::spawn(async move {
        tokio::select! {
            _ = a.wait_for(|s| *s) => {}
            _ = b.wait_for(|s| *s) => {}
            () = tx.closed() => return,
        }
        let _ = tx.send(true);
    });
    rx
}

/// The chain for a later term of ownership: `None` (logged) for a tenant whose plugins do not
/// load, an error for a pipeline's.
async fn term_chain(
    sandbox: &Arc<Sandbox>,
    pipeline: &PipelineConfig,
    plugin_dir: &Path,
) -> Result<Option<Chain>, Error> {
    match load_chain(sandbox, pipeline.clone(), plugin_dir.to_path_buf()).await {
        Ok(chain) => Ok(Some(chain)),
        Err(err) if pipeline.tenant.is_some() => {
            held_tenant(&pipeline.id, &err);
            Ok(None)
        }
        Err(err) => Err(err),
    }
}

/// Logs why a tenant's plugins did not load and keeps it as the tenant's last error (on
/// `/status`, beside its `held` state).
fn held_tenant(unit: &str, err: &Error) {
    tracing::error!(pipeline = %unit, "tenant held until its plugins load: {err}");
    metrics::pipeline(unit).set_error(&format!("held until its plugins load: {err}"));
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
