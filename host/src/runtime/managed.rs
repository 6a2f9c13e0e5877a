//! Tenants managed at run time: this instance's runtime follows the tenant bucket the admin
//! API writes (see `crate::admin`). A tenant added is started; one whose plugins alone
//! changed (components, their config, limits, capabilities, quarantine) gets its new chain
//! swapped in between batches, like a hot reload; one changed otherwise is restarted with
//! its new spec (drained and checkpointed first, so nothing is lost or repeated); one
//! suspended or removed is stopped; and nothing else is touched: every tenant is a unit of
//! its own with its own stop signal ([`start`] and [`Running::stop`] are the two entry
//! points). With high availability every instance follows the bucket and the units' leases
//! decide which instance runs each tenant.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::units::{self, UnitChain, UnitContext};
use crate::admin::{TenantRecord, TenantStore};
use crate::config::{Config, PipelineConfig};
use crate::error::Error;
use crate::ha::lease::Coordinator;
use crate::ops::metrics;
use crate::plugin::reload::{self, ChainUpdate};
use crate::sandbox::Sandbox;

/// What every managed unit shares.
pub(crate) struct Shared {
    pub(crate) config: Arc<Config>,
    pub(crate) store: Arc<TenantStore>,
    pub(crate) sandbox: Arc<Sandbox>,
    pub(crate) js: async_nats::jetstream::Context,
    pub(crate) ha: Option<Arc<Coordinator>>,
    /// The oplog headroom watches, which each unit joins while it runs.
    pub(crate) oplog: crate::ops::oplog::Watches,
}

/// One tenant unit running (or held, waiting for a plugin push).
pub(crate) struct Running {
    /// The record it was started from, to tell a real change from a repeat.
    record: TenantRecord,
    /// The unit as it runs (plugins resolved to local component copies).
    unit: PipelineConfig,
    /// Set while the unit waits for plugins that load.
    held: Arc<AtomicBool>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    /// New chains for the unit (and, kept open, what lets a held unit wait).
    updates: mpsc::UnboundedSender<ChainUpdate>,
}

impl Running {
    /// Stops the unit: it drains, checkpoints and ends (within its shutdown timeout).
    pub(crate) async fn stop(self, id: &str, shared: &Shared) {
        let _ = self.stop.send(true);
        if let Err(err) = self.task.await {
            tracing::error!(pipeline = %id, "tenant unit task failed: {err}");
        }
        if let Some(ha) = &shared.ha {
            ha.count_unit(false);
        }
        shared.oplog.remove(id);
        metrics::forget(id);
    }
}

/// Starts tenant `id` from `record`: resolves its plugins to local copies of their
/// components, loads them on a thread of its own and runs the unit. A tenant whose plugins
/// cannot be had (not pushed yet, or refused) is held: it reads nothing until a push
/// changes its record.
pub(crate) async fn start(
    id: &str,
    record: TenantRecord,
    shared: &Shared,
) -> Result<Running, String> {
    let tenant = record.tenant_config()?;
    let streams = Default::default();
    let mut unit = shared
        .config
        .tenant_unit(&record.pipeline, tenant, &streams)?;
    let chain = match resolve_components(&mut unit, &shared.store).await {
        Ok(()) => UnitChain::load(&shared.sandbox, &unit, &shared.config.plugin_dir),
        Err(reason) => {
            tracing::warn!(pipeline = %id, "tenant held: {reason}");
            metrics::pipeline(id).set_error(&reason);
            UnitChain::Loaded(None)
        }
    };
    let (updates_tx, updates_rx) = mpsc::unbounded_channel();
    let held = Arc::new(AtomicBool::new(false));
    let context = UnitContext {
        chain,
        held: held.clone(),
        updates: Arc::new(tokio::sync::Mutex::new(updates_rx)),
        sandbox: shared.sandbox.clone(),
        plugin_dir: shared.config.plugin_dir.clone(),
        js: shared.js.clone(),
        ha: shared.ha.clone(),
    };
    if let Some(ha) = &shared.ha {
        ha.count_unit(true);
    }
    shared.oplog.add(&unit);
    let (stop, stopped) = watch::channel(false);
    let unit_id = id.to_string();
    let running_unit = unit.clone();
    let task = tokio::spawn(async move {
        if let Err(err) = units::run_unit(unit, context, stopped).await {
            tracing::error!(pipeline = %unit_id, error = %err, "tenant unit stopped; the other units carry on");
        }
    });
    tracing::info!(pipeline = %id, "tenant started");
    Ok(Running {
        record,
        unit: running_unit,
        held,
        stop,
        task,
        updates: updates_tx,
    })
}

/// Points every plugin of `unit` at the local copy of its component.
async fn resolve_components(unit: &mut PipelineConfig, store: &TenantStore) -> Result<(), String> {
    for plugin in &mut unit.plugins {
        let Some(digest) = &plugin.sha256 else {
            return Err(format!("plugin '{}' has not been pushed yet", plugin.name));
        };
        plugin.file = Some(store.component_path(digest).await?);
    }
    Ok(())
}

/// Follows the tenant bucket until `stop`, then stops every tenant unit (each drains and
/// checkpoints) and returns.
pub(crate) async fn run(shared: Shared, mut stop: watch::Receiver<bool>) -> Result<(), Error> {
    let mut running: HashMap<String, Running> = HashMap::new();
    'watching: while !*stop.borrow() {
        let mut watch = match shared.store.kv().watch_with_history(">").await {
            Ok(watch) => watch,
            Err(err) => {
                tracing::warn!("cannot watch the tenant bucket (retrying): {err}");
                tokio::select! {
                    _ = stop.changed() => break,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        // A fresh watch replays every current record; tenants deleted while it was down
        // are found by listing.
        forget_deleted(&mut running, &shared).await;
        loop {
            let entry = tokio::select! {
                _ = stop.changed() => break 'watching,
                entry = watch.next() => entry,
            };
            match entry {
                Some(Ok(entry)) => apply(entry, &mut running, &shared).await,
                Some(Err(err)) => {
                    tracing::warn!("tenant bucket watch failed (watching again): {err}");
                    break;
                }
                None => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stopping = running.drain().map(|(id, unit)| {
        let shared = &shared;
        async move { unit.stop(&id, shared).await }
    });
    futures::future::join_all(stopping).await;
    Ok(())
}

/// Stops units whose tenant is no longer in the bucket.
async fn forget_deleted(running: &mut HashMap<String, Running>, shared: &Shared) {
    let Ok(listed) = shared.store.list().await else {
        return;
    };
    let gone: Vec<String> = running
        .keys()
        .filter(|id| !listed.iter().any(|(listed, _)| listed == *id))
        .cloned()
        .collect();
    for id in gone {
        if let Some(unit) = running.remove(&id) {
            tracing::info!(pipeline = %id, "tenant removed");
            unit.stop(&id, shared).await;
        }
    }
}

/// Brings tenant `entry.key` in line with its record.
async fn apply(entry: kv::Entry, running: &mut HashMap<String, Running>, shared: &Shared) {
    let id = entry.key.clone();
    let record = match entry.operation {
        kv::Operation::Put => match serde_json::from_slice::<TenantRecord>(&entry.value) {
            Ok(record) => Some(record),
            Err(err) => {
                tracing::error!(pipeline = %id, "tenant record does not parse; left as it is: {err}");
                return;
            }
        },
        kv::Operation::Delete | kv::Operation::Purge => None,
    };
    if let Some(record) = &record {
        if !shared
            .config
            .managed
            .iter()
            .any(|p| p.id == record.pipeline)
        {
            tracing::warn!(pipeline = %id, "tenant of pipeline '{}', which this instance's config does not take from NATS; not run here", record.pipeline);
            return;
        }
    }
    // A new token changes nothing the unit runs with.
    if let (Some(now), Some(new)) = (running.get(&id), &record) {
        let (a, b) = (&now.record, new);
        if (&a.pipeline, &a.tenant, a.suspended) == (&b.pipeline, &b.tenant, b.suspended) {
            return;
        }
    }
    if let (Some(now), Some(new)) = (running.get_mut(&id), &record) {
        if swap_chain(&id, now, new, shared).await {
            return;
        }
    }
    if let Some(unit) = running.remove(&id) {
        let why = match &record {
            None => "removed",
            Some(r) if r.suspended => "suspended",
            Some(_) => "changed: restarting it",
        };
        tracing::info!(pipeline = %id, "tenant {why}");
        unit.stop(&id, shared).await;
    }
    let Some(record) = record.filter(|r| !r.suspended) else {
        metrics::forget(&id);
        return;
    };
    match start(&id, record, shared).await {
        Ok(unit) => {
            running.insert(id, unit);
        }
        Err(err) => {
            tracing::error!(pipeline = %id, "tenant not started: {err}");
            metrics::pipeline(&id).set_error(&err);
        }
    }
}

/// Swaps a running tenant's chain for the one `new` describes when nothing but its plugins
/// changed: the unit carries on between two batches, keeping its change stream (or its place
/// on the shared one) and its position. `false` when a restart is needed: anything else
/// changed, it is suspended, held, or a plugin is not pushed yet. A chain that fails to load
/// leaves the running one in place, as a refused hot reload does.
async fn swap_chain(id: &str, now: &mut Running, new: &TenantRecord, shared: &Shared) -> bool {
    if new.suspended || now.record.suspended || now.held.load(Ordering::Acquire) {
        return false;
    }
    let Ok(tenant) = new.tenant_config() else {
        return false;
    };
    let Ok(mut unit) = shared
        .config
        .tenant_unit(&new.pipeline, tenant, &Default::default())
    else {
        return false;
    };
    if !reload::same_but_chain(&unit, &now.unit)
        || resolve_components(&mut unit, &shared.store).await.is_err()
    {
        return false;
    }
    match reload::load_chain(&shared.sandbox, &unit, &shared.config.plugin_dir).await {
        Ok(chain) => {
            tracing::info!(pipeline = %id, "tenant's plugins changed: new chain swapped in");
            let _ = now.updates.send(ChainUpdate::Chain(chain));
            now.unit = unit;
        }
        Err(message) => {
            metrics::pipeline(id).reload_refused();
            tracing::error!(pipeline = %id, "tenant's new plugins refused; the running ones stay: {message}");
        }
    }
    now.record = new.clone();
    true
}
