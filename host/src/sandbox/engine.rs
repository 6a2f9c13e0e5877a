//! The shared engine: its settings (fuel, epochs, the pooling allocator sized from the
//! config), the thread that advances its epoch, and admission in front of the instance pool.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::limits::{EPOCH_TICK, MAX_CORE_INSTANCES, MAX_MEMORIES, MAX_TABLES, MAX_TABLE_ELEMENTS};
use crate::config::PluginLimits;

/// Admission control in front of the instance pool: counts live instances against
/// `sandbox.max_instances`.
pub struct Admission {
    capacity: u32,
    used: AtomicU32,
    pub(super) pooled: bool,
    pool_memory_mib: u32,
}

impl Admission {
    /// No instance admitted yet; `pooled` instances must also fit slots of
    /// `pool_memory_mib`.
    pub(super) fn new(capacity: u32, pooled: bool, pool_memory_mib: u32) -> Admission {
        Admission {
            capacity,
            used: AtomicU32::new(0),
            pooled,
            pool_memory_mib,
        }
    }

    /// Reserves one instance slot; the slot is freed when the returned [`Slot`] drops.
    pub fn admit(self: &Arc<Self>, limits: &PluginLimits) -> Result<Slot, String> {
        if self.pooled && limits.memory_mib > self.pool_memory_mib {
            return Err(format!(
                "its memory limit ({} MiB) is larger than the instance pool's slots ({} MiB), \
                 which are sized at start-up from the config; restart tidegate to apply it",
                limits.memory_mib, self.pool_memory_mib
            ));
        }
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            if used >= self.capacity {
                return Err(format!(
                    "all {} plugin instance slots are in use (sandbox.max_instances)",
                    self.capacity
                ));
            }
            match self.used.compare_exchange_weak(
                used,
                used + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(Slot(self.clone())),
                Err(now) => used = now,
            }
        }
    }

    /// Instances alive now.
    pub fn in_use(&self) -> u32 {
        self.used.load(Ordering::Relaxed)
    }
}

pub(super) fn new_engine(pool: Option<(u32, u32)>) -> Result<Engine, String> {
    Engine::new(&engine_config(pool)).map_err(|err| format!("cannot create engine: {err}"))
}

/// The engine settings; `pool` is (instances, MiB per memory) for the pooling allocator.
pub(super) fn engine_config(pool: Option<(u32, u32)>) -> Config {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.consume_fuel(true);
    config.epoch_interruption(true);
    if let Some((instances, memory_mib)) = pool {
        // Components built from Python or JavaScript hold several core modules, memories and
        // large tables; the per-instance figures leave room for them. The counts per instance
        // are the ones `Footprint` enforces on demand, so both allocators refuse the same
        // components; the bytes are capped by `Footprint` in both.
        let mut pooling = PoolingAllocationConfig::new();
        pooling
            .total_component_instances(instances)
            .total_core_instances(instances * 8)
            .total_memories(instances * 4)
            .total_tables(instances * 8)
            .max_memory_size(memory_mib as usize * 1024 * 1024)
            .max_memories_per_module(MAX_MEMORIES as u32)
            .max_tables_per_module(MAX_TABLES as u32)
            .table_elements(MAX_TABLE_ELEMENTS)
            .max_core_instance_size(16 * 1024 * 1024)
            .max_component_instance_size(16 * 1024 * 1024)
            .max_core_instances_per_component(MAX_CORE_INSTANCES as u32)
            .max_memories_per_component(MAX_MEMORIES as u32)
            .max_tables_per_component(MAX_TABLES as u32);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
    }
    config
}

/// The nice value plugins are compiled at (see [`compile_pool`]).
pub const COMPILE_NICE: i32 = 10;

/// The threads that compile plugins (one per core; wasmtime spreads a component's functions
/// over them), at nice [`COMPILE_NICE`]. Compiling a large component is seconds of CPU on
/// every core, which the running tenants' events would otherwise share evenly with it: a
/// tenant pushing one version after another would take half of a 2-core machine. At nice 10
/// a compile gets about a tenth of a busy machine and all of an idle one. `None` if the
/// threads cannot be started (compiles then run on the caller's thread, as before).
pub(super) fn compile_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let built = rayon::ThreadPoolBuilder::new()
            .thread_name(|n| format!("tidegate-compile-{n}"))
            .start_handler(|_| {
                if let Err(err) = super::pool::set_nice(COMPILE_NICE) {
                    tracing::warn!(error = %err, "cannot lower a plugin compiler thread's priority");
                }
            })
            .build();
        built
            .map_err(|err| tracing::warn!(error = %err, "no plugin compiler threads: compiling on the loading thread"))
            .ok()
    })
    .as_ref()
}

/// One admitted instance; frees its slot when dropped.
pub struct Slot(Arc<Admission>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Starts the thread that advances `engine`'s epoch every [`EPOCH_TICK`], so call deadlines
/// fire; it ends when the returned flag is set or the engine is gone.
pub(super) fn start_ticker(engine: &Engine) -> Result<Arc<AtomicBool>, String> {
    let stop_ticker = Arc::new(AtomicBool::new(false));
    let ticker_engine = engine.weak();
    let stop = stop_ticker.clone();
    std::thread::Builder::new()
        .name("tidegate-epoch".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(EPOCH_TICK);
                match ticker_engine.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => break,
                }
            }
        })
        .map_err(|err| format!("cannot start epoch thread: {err}"))?;
    Ok(stop_ticker)
}
