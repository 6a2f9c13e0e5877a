//! The wasm sandbox: one shared engine, the compiled-component cache, instance admission,
//! and the limits and capabilities every plugin call runs under.
//!
//! - **Fuel** bounds the CPU of one call deterministically: a replayed event gets the same
//!   verdict, which a wall-clock limit alone cannot promise.
//! - **Epochs** bound its wall-clock time as a backstop (a host call that blocks, a
//!   pathological compile of a loop): a ticker thread advances the engine's epoch every
//!   [`EPOCH_TICK`], and each call gets a deadline in ticks.
//! - **Memory** is capped per plugin instance by [`Footprint`], the store's resource limiter:
//!   every linear memory's bytes plus [`TABLE_ELEMENT_BYTES`] per table element, of all the
//!   core instances of the component together, count against `limits.memory_mib`. Growth
//!   past it traps (a memory bomb is a trap with a reason rather than an allocation failure
//!   the guest ignores), and a component whose declared minimums alone exceed it is refused
//!   at load ([`check_declared`]). The counts per instance ([`MAX_MEMORIES`],
//!   [`MAX_TABLES`], [`MAX_TABLE_ELEMENTS`]) are the same for pooled and on-demand
//!   instances. The WASI resources an instance holds in host memory are capped too
//!   ([`MAX_RESOURCES`]).
//! - **Compiling** runs in tidegate's own process, its memory and time growing with a
//!   function's size: a function body over [`MAX_FUNCTION_BYTES`] is refused before it is
//!   compiled ([`check_declared`]), and compiles run at a lower priority than the tenants'
//!   events (`engine::compile_pool`).
//! - **Admission**: at most `sandbox.max_instances` instances live at once; past it loading
//!   fails with a clear error instead of exhausting the pool or the machine.
//! - **Workers**: every unit's plugin chain runs in short turns on one process-wide pool of
//!   worker threads (`sandbox.workers`, one per core by default), handed out fairly by CPU
//!   time used, with units using more than their fair share moved to low-priority
//!   background workers (see [`pool`] and `fair`).
//! - **Loading**: at most one plugin load (instantiate and `init`) per core runs at once
//!   ([`Sandbox::loading`]), so that a thousand tenants starting together do not share two
//!   cores a thousand ways and each `init` meets its deadline, counted from its own start.
//!   A compiled component is kept in memory by hash, so K tenants with the same plugin
//!   share one copy of its code.
//! - **Capabilities**: the linker offers `tidegate:plugin/{log,config}` and WASI 0.2, the
//!   latter deny-by-default (see [`wasi_context`]), its clock waits bounded by the call's
//!   deadline ([`link_waits`]); any other import is refused at load.
//!
//! A store whose call trapped is never reused: the plugin gets a fresh instance for the next
//! event (see `plugin::Plugin`).

mod cache;
mod engine;
mod fair;
mod limits;
pub mod pool;
#[cfg(test)]
mod tests;
mod wasi;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::WasiCtx;

use crate::config::{PluginLimits, SandboxConfig};

pub use engine::{Admission, Slot};
pub use limits::{
    arm, check_declared, fuel_used, trap_reason, LimitExceeded, LogBudget, EPOCH_TICK,
    MAX_FUNCTION_BYTES, MAX_MEMORIES, MAX_RESOURCES, MAX_TABLES, MAX_TABLE_ELEMENTS,
    TABLE_ELEMENT_BYTES,
};
pub use pool::{PoolAccount, Ran, Strain, WorkerPool};
pub use wasi::{link_waits, wasi_context, WaitPastDeadline, Wasi};

use cache::ComponentCache;
pub use cache::{mark_cache_file_used, trim_cache_dir};
use limits::Footprint;

/// Compiled components kept in memory, by hash, before the oldest are forgotten (a
/// forgotten one is reloaded from the on-disk cache when next needed).
const MEMO_COMPONENTS: usize = 64;

/// How long a plugin load holds its load permit (see [`Sandbox::loading`]).
pub const SLOW_LOAD: std::time::Duration = std::time::Duration::from_secs(1);

/// The engine shared by every plugin, and the thread that drives its epoch.
pub struct Sandbox {
    engine: Engine,
    stop_ticker: Arc<AtomicBool>,
    cache: Option<ComponentCache>,
    admission: Arc<Admission>,
    /// Compiled components by hash (see [`Sandbox::compile`]); the per-hash lock makes K
    /// loads of one new plugin compile it once.
    memo: Mutex<Memo>,
    /// Plugin loads running at once (see [`Sandbox::loading`]).
    loads: Arc<tokio::sync::Semaphore>,
}

/// The in-memory component memo: each hash's slot, and the hashes oldest first.
#[derive(Default)]
struct Memo {
    slots: HashMap<String, Arc<Mutex<Option<Component>>>>,
    order: VecDeque<String>,
}

/// A compiled component and where it came from.
pub struct Compiled {
    /// The component, ready to link.
    pub component: Component,
    /// `sha256:<hex>` of the file's bytes: names the exact plugin version in dead-letter
    /// headers and logs.
    pub hash: String,
    /// Whether it came from a cache (this process's memory, or the disk) instead of being
    /// compiled.
    pub cached: bool,
}

impl Sandbox {
    /// Creates the engine with fuel and epoch interruption on, the pooling allocator if
    /// configured and possible (its slots sized for `largest_memory_mib`), and the cache.
    pub fn new(config: &SandboxConfig, largest_memory_mib: u32) -> Result<Sandbox, String> {
        pool::configure(config.workers, config.background);
        let pool_memory_mib = largest_memory_mib.max(64);
        let (engine, pooled) = if config.pooling {
            match Engine::new(&engine::engine_config(Some((
                config.max_instances,
                pool_memory_mib,
            )))) {
                Ok(engine) => (engine, true),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot reserve the plugin instance pool; allocating instances on demand");
                    (engine::new_engine(None)?, false)
                }
            }
        } else {
            (engine::new_engine(None)?, false)
        };
        let cache = if config.cache {
            match ComponentCache::open(config.cache_dir.clone(), config.cache_max_mib, &engine) {
                Ok(cache) => Some(cache),
                Err(message) => {
                    tracing::warn!("compiled-plugin cache disabled: {message}");
                    None
                }
            }
        } else {
            None
        };
        let stop_ticker = engine::start_ticker(&engine)?;
        Ok(Sandbox {
            engine,
            stop_ticker,
            cache,
            admission: Arc::new(Admission::new(
                config.max_instances,
                pooled,
                pool_memory_mib,
            )),
            memo: Mutex::default(),
            loads: Arc::new(tokio::sync::Semaphore::new(load_concurrency())),
        })
    }

    /// Runs `load` (a plugin or chain load: instantiation and `init`) on a blocking thread
    /// once one of the load permits is free: one load per core at once, whoever asks
    /// (start-up, tenants added at run time, hot reloads, uploads). Each load's `init`
    /// deadline starts when it runs, so a queue of loads in front of it cannot make it
    /// late. A load still running after [`SLOW_LOAD`] (a spinning or slow `init`, a large
    /// compile) gives its permit back and finishes outside the bound, so it delays the
    /// loads queued behind it by that much at most.
    pub async fn loading<T, F>(self: &Arc<Self>, load: F) -> Result<T, String>
    where
        T: Send + 'static,
        F: FnOnce(&Sandbox) -> T + Send + 'static,
    {
        let permit = self
            .loads
            .clone()
            .acquire_owned()
            .await
            .map_err(|err| format!("plugin loading has stopped: {err}"))?;
        let sandbox = self.clone();
        let mut running = tokio::task::spawn_blocking(move || load(&sandbox));
        let done = tokio::select! {
            done = &mut running => done,
            () = tokio::time::sleep(SLOW_LOAD) => {
                drop(permit);
                running.await
            }
        };
        done.map_err(|err| format!("plugin loader task failed: {err}"))
    }

    /// The shared engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Whether instances come from the pre-reserved pool.
    pub fn is_pooled(&self) -> bool {
        self.admission.pooled
    }

    /// The admission counter every plugin instance must pass.
    pub fn admission(&self) -> Arc<Admission> {
        self.admission.clone()
    }

    /// Compiles a component, or loads it from the cache when this exact file was compiled
    /// before by this exact engine.
    pub fn compile(&self, bytes: &[u8]) -> Result<Compiled, String> {
        let hash = format!("sha256:{:x}", Sha256::digest(bytes));
        let slot = self.memo_slot(&hash);
        // Held while compiling: the other loads of this file wait for this one's result.
        let mut memo = slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(component) = memo.as_ref() {
            return Ok(Compiled {
                component: component.clone(),
                hash,
                cached: true,
            });
        }
        let compiled = self.compile_unmemoized(bytes, hash)?;
        *memo = Some(compiled.component.clone());
        Ok(compiled)
    }

    /// The memo's slot for `hash`, made (and the oldest forgotten past
    /// [`MEMO_COMPONENTS`]) if new.
    fn memo_slot(&self, hash: &str) -> Arc<Mutex<Option<Component>>> {
        let mut memo = self.memo.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = memo.slots.get(hash) {
            return slot.clone();
        }
        while memo.order.len() >= MEMO_COMPONENTS {
            if let Some(oldest) = memo.order.pop_front() {
                memo.slots.remove(&oldest);
            }
        }
        let slot = Arc::new(Mutex::new(None));
        memo.slots.insert(hash.to_string(), slot.clone());
        memo.order.push_back(hash.to_string());
        slot
    }

    /// Compiles a component, or loads it from the on-disk cache.
    fn compile_unmemoized(&self, bytes: &[u8], hash: String) -> Result<Compiled, String> {
        if let Some(cache) = &self.cache {
            if let Some(component) = cache.load(&self.engine, &hash) {
                return Ok(Compiled {
                    component,
                    hash,
                    cached: true,
                });
            }
        }
        let compile = || Component::new(&self.engine, bytes);
        let component = match engine::compile_pool() {
            Some(pool) => pool.install(compile),
            None => compile(),
        }
        .map_err(|err| format!("{err:#}"))?;
        if let Some(cache) = &self.cache {
            cache.store(&hash, &component);
        }
        Ok(Compiled {
            component,
            hash,
            cached: false,
        })
    }
}

/// Plugin loads that run at once: one per core (at least one).
fn load_concurrency() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

/// What a plugin's store holds: who it is, what it may read, and its limits.
pub struct PluginState {
    /// Plugin name, for log lines.
    pub plugin: String,
    /// The unit (pipeline, or `<pipeline>.<tenant>`) running it, for log lines.
    pub pipeline: String,
    /// The tenant running it, if any, for log lines.
    pub tenant: Option<String>,
    /// The plugin's own config (what its `config` import returns).
    pub config: BTreeMap<String, String>,
    /// The event of the call in progress, for contract 0.2's `event` import (which reads its
    /// documents in place); `None` between calls and for 0.1 plugins, whose calls carry it.
    pub event: Option<std::sync::Arc<crate::model::Change>>,
    footprint: Footprint,
    log: LogBudget,
    wasi: WasiCtx,
    /// Where the plugin's monotonic clock starts (`None`: stopped), for its waits.
    clock: Option<std::time::Instant>,
    /// When the call in progress reaches its deadline (set by [`arm`]), for its waits.
    call_ends: Option<std::time::Instant>,
    /// Nanoseconds the plugin's waits have blocked since [`PluginState::take_waited`].
    waited: Arc<std::sync::atomic::AtomicU64>,
    table: ResourceTable,
    _slot: Slot,
}

impl PluginState {
    /// Bytes of memories and tables the instance holds now (they never shrink, so this is
    /// also its peak): what counts against `limits.memory_mib`.
    pub fn memory_peak(&self) -> usize {
        self.footprint.used()
    }

    /// How long the plugin's waits have blocked since the last call of this (see `wasi`).
    pub fn take_waited(&mut self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.waited.swap(0, Ordering::Relaxed))
    }

    /// The log budget of the current call.
    pub fn log_budget(&mut self) -> &mut LogBudget {
        &mut self.log
    }
}

/// An empty table for an instance's WASI resources, holding at most [`MAX_RESOURCES`].
fn resource_table() -> ResourceTable {
    let mut table = ResourceTable::new();
    table.set_max_capacity(MAX_RESOURCES);
    table
}

/// A fresh store for one plugin instance, with its memory cap and capabilities installed;
/// `scope` is the (unit, tenant) running it, for its log lines.
pub fn new_store(
    engine: &Engine,
    plugin: &str,
    scope: (&str, Option<&str>),
    config: &BTreeMap<String, String>,
    limits: &PluginLimits,
    wasi: Wasi,
    slot: Slot,
) -> Store<PluginState> {
    let state = PluginState {
        plugin: plugin.to_string(),
        pipeline: scope.0.to_string(),
        tenant: scope.1.map(str::to_string),
        config: config.clone(),
        event: None,
        footprint: Footprint::new(limits),
        log: LogBudget::new(limits),
        wasi: wasi.ctx,
        clock: wasi.clock,
        call_ends: None,
        waited: Arc::default(),
        table: resource_table(),
        _slot: slot,
    };
    let mut store = Store::new(engine, state);
    store.limiter(|state| state);
    store
}
