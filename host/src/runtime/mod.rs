//! The running process: every unit of the config started at once over one shared sandbox
//! and one NATS connection, with the operations endpoint, the oplog headroom watch and hot
//! reload beside them; stopping them all on shutdown or when a pipeline fails.

mod managed;
mod nats;
mod units;

use std::future::Future;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::error::Error;
use crate::ha::lease::Coordinator;
use crate::ops::{http, oplog};
use crate::pipeline::AbortOnDrop;
use crate::plugin::{reload, Chain};
use crate::sandbox::Sandbox;
use units::{UnitChain, UnitContext};

/// Loads every pipeline's plugins, checking each against the contract. Used by
/// `tidegate check`.
pub fn load_chains(config: &Config, sandbox: &Sandbox) -> Result<Vec<Chain>, Error> {
    // `run` loads them itself, to hold tenants whose plugins fail instead of refusing all.
    config
        .pipelines
        .iter()
        .map(|p| Chain::load(sandbox, p, &config.plugin_dir))
        .collect()
}

/// Creates the shared sandbox for `config`.
pub fn new_sandbox(config: &Config) -> Result<Sandbox, Error> {
    Sandbox::new(&config.sandbox, config.largest_memory_mib())
        .map_err(|message| Error::Startup { message })
}

/// Runs every pipeline of `config` until `shutdown` resolves (then drains in-flight messages,
/// checkpoints and returns `Ok`) or a pipeline fails (then stops the others the same way and
/// returns its error).
///
/// Tenants are isolated from each other: every unit's plugin load is a task of its own,
/// run as soon as one of the sandbox's load permits (one per core) is free, with its `init`
/// deadline counted from its own start; a tenant starts as soon as its own chain is loaded,
/// whatever the others' `init` is doing. A tenant whose plugins do not load is held (it reads nothing and keeps
/// its checkpoint until a working plugin appears), and a tenant unit that fails stops alone,
/// while the others carry on. A pipeline without tenants whose plugins do not load stops
/// start-up.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    no_transparent_huge_pages();
    if let Some(http) = &config.http {
        crate::ops::metrics::set_max_tenant_series(http.max_tenant_series);
    }
    let sandbox = Arc::new(new_sandbox(&config)?);
    let loads: Vec<_> = config
        .pipelines
        .iter()
        .map(|pipeline| UnitChain::load(&sandbox, pipeline, &config.plugin_dir))
        .collect();
    // Pipelines without tenants must load before anything starts (their failure is fatal);
    // tenants' loads carry on meanwhile, and each tenant's unit waits for its own.
    let mut chains = Vec::new();
    for (pipeline, load) in config.pipelines.iter().zip(loads) {
        chains.push(load.required(pipeline).await?);
    }
    let nats = nats::connect(&config).await?;
    let admin_listener = match &config.admin {
        Some(admin) => Some(crate::admin::bind(admin).await?),
        None => None,
    };
    let _http = match &config.http {
        Some(address) => Some(AbortOnDrop(tokio::spawn(http::serve(
            http::bind(address).await?,
            nats.client.clone(),
        )))),
        None => None,
    };
    // The oplog headroom: metrics, `/readyz`, and warnings before a position falls out. One
    // MongoDB client and one watch per deployment for all its units (K tenants, one reading
    // of the oplog per interval); managed tenants join and leave it as they start and stop.
    let (_oplog_stop, oplog_stopped) = watch::channel(false);
    let oplog = oplog::Watches::new(oplog_stopped);
    for unit in &config.pipelines {
        oplog.add(unit);
    }
    let js = nats.jetstream(&config);
    tokio::pin!(shutdown);
    tokio::select! {
        _ = &mut shutdown => return Ok(()),
        () = nats.connected() => {}
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let ha = match config.ha.enabled {
        true => Some(Coordinator::open(&js, &config.ha, lease_count(&config)).await?),
        false => None,
    };
    if let Some(ha) = &ha {
        let presence = ha.clone().run_presence(stop_rx.clone());
        tasks.spawn(async move { (false, presence.await) });
    }
    let _admin = match admin_listener {
        Some(listener) => {
            let shared = managed_shared(&config, &sandbox, &js, &ha, &oplog).await?;
            let admin = crate::admin::Admin::new(
                shared.config.clone(),
                shared.store.clone(),
                sandbox.clone(),
                js.clone(),
            )?;
            let serve = crate::admin::serve(listener, Arc::new(admin));
            let stop = stop_rx.clone();
            tasks.spawn(async move { (false, managed::run(shared, stop).await) });
            Some(AbortOnDrop(tokio::spawn(serve)))
        }
        None => None,
    };
    let mut handles = Vec::new();
    for (pipeline, chain) in config.pipelines.iter().cloned().zip(chains) {
        let (updates_tx, updates_rx) = tokio::sync::mpsc::unbounded_channel();
        let held = Arc::new(AtomicBool::new(chain.is_loading()));
        handles.push(reload::UnitHandle::new(
            pipeline.clone(),
            &config.plugin_dir,
            updates_tx,
            held.clone(),
        ));
        let context = UnitContext {
            chain,
            held,
            updates: Arc::new(tokio::sync::Mutex::new(updates_rx)),
            sandbox: sandbox.clone(),
            plugin_dir: config.plugin_dir.clone(),
            js: js.clone(),
            ha: ha.clone(),
        };
        let is_tenant = pipeline.tenant.is_some();
        let stop = stop_rx.clone();
        tasks.spawn(async move { (is_tenant, units::run_unit(pipeline, context, stop).await) });
    }
    let reloader = tokio::spawn(reload::run(
        sandbox.clone(),
        config.clone(),
        handles,
        stop_rx.clone(),
    ));
    let outcome = supervise(&config, tasks, &stop_tx, shutdown).await;
    let _ = stop_tx.send(true);
    let _ = reloader.await;
    nats.flush().await;
    outcome
}

/// What the tenants managed through the admin API share: the tenant store (opened, or
/// created, in NATS), the sandbox, the JetStream context and the leases.
async fn managed_shared(
    config: &Config,
    sandbox: &Arc<Sandbox>,
    js: &async_nats::jetstream::Context,
    ha: &Option<Arc<Coordinator>>,
    oplog: &oplog::Watches,
) -> Result<managed::Shared, Error> {
    let Some(admin) = &config.admin else {
        return Err(Error::Startup {
            message: "the admin API needs an [admin] section".into(),
        });
    };
    let store = crate::admin::TenantStore::open(js, admin).await?;
    Ok(managed::Shared {
        config: Arc::new(config.clone()),
        store: Arc::new(store),
        sandbox: sandbox.clone(),
        js: js.clone(),
        ha: ha.clone(),
        oplog: oplog.clone(),
    })
}

/// How many leases the config's units take with high availability: one per unit, but one
/// for all the tenants of a pipeline with a shared reader.
fn lease_count(config: &Config) -> usize {
    let mut shared = std::collections::HashSet::new();
    config
        .pipelines
        .iter()
        .filter(|unit| match &unit.tenant {
            Some(tenant) if unit.tenant_reader == crate::config::TenantReader::Shared => {
                shared.insert(tenant.pipeline.clone())
            }
            _ => true,
        })
        .count()
}

/// Waits for every unit to end, stopping them all on `shutdown` or when a pipeline (not a
/// tenant) fails, and returns the first failure.
async fn supervise(
    config: &Config,
    mut tasks: JoinSet<(bool, Result<(), Error>)>,
    stop_tx: &watch::Sender<bool>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    tokio::pin!(shutdown);
    let mut outcome = Ok(());
    let mut stopping = false;
    // Each unit stops itself within its `shutdown_timeout_secs`; this backstop also bounds
    // what comes after (releasing leases) should NATS not answer.
    let backstop = Duration::from_secs(
        config
            .pipelines
            .iter()
            .map(|p| p.shutdown_timeout_secs)
            .max()
            .unwrap_or(30)
            + 10,
    );
    // Armed when stopping begins.
    let stop_by = tokio::time::sleep(Duration::from_secs(365 * 24 * 3600));
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
                let Err(err) = result else { continue };
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
    tasks.abort_all();
    outcome
}

/// Turns transparent huge pages off for this process. The allocator (mimalloc) asks the
/// kernel for huge pages on its memory (`MADV_HUGEPAGE`), so where the machine's THP setting
/// is `madvise` or `always` each fresh 2 MiB region is zeroed whole on its first touch, and
/// again after the allocator hands it back: with a thousand tenants (their buffers spread
/// over many regions) that zeroing was a fifth of tidegate's CPU, and it cost nothing at one
/// tenant (BENCHMARKS.md, "Huge pages"). Turning it off for the process (`PR_SET_THP_DISABLE`,
/// what mimalloc's own `MIMALLOC_ALLOW_THP=0` does) leaves the machine's setting alone.
/// `TIDEGATE_KEEP_THP=1` in the environment keeps them (to measure the difference). A
/// refusal only keeps the cost: logged.
#[cfg(target_os = "linux")]
fn no_transparent_huge_pages() {
    if std::env::var_os("TIDEGATE_KEEP_THP").is_some_and(|v| v == "1") {
        return;
    }
    // SAFETY: `prctl` with PR_SET_THP_DISABLE reads only its integer arguments and changes
    // only this process's memory policy.
    if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
        tracing::info!(
            error = %std::io::Error::last_os_error(),
            "cannot turn transparent huge pages off for this process"
        );
    }
}

/// Elsewhere: nothing to turn off (see the Linux version).
#[cfg(not(target_os = "linux"))]
fn no_transparent_huge_pages() {}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    /// Once tidegate runs, the process has transparent huge pages off.
    #[test]
    fn transparent_huge_pages_are_off() {
        super::no_transparent_huge_pages();
        // SAFETY: PR_GET_THP_DISABLE only reads this process's flag.
        let disabled = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        assert_eq!(disabled, 1);
    }
}
