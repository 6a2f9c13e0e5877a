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
//!   instances.
//! - **Admission**: at most `sandbox.max_instances` instances live at once; past it loading
//!   fails with a clear error instead of exhausting the pool or the machine.
//! - **Capabilities**: the linker offers `tidegate:plugin/{log,config}` and WASI 0.2, the
//!   latter deny-by-default (see [`wasi_context`]); any other import is refused at load.
//!
//! A store whose call trapped is never reused: the plugin gets a fresh instance for the next
//! event (see `plugin::Plugin`).

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::config::{Capabilities, PluginLimits, SandboxConfig};

/// How often the epoch advances; call deadlines are rounded up to it.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// What one table element costs against the memory cap: a pointer, which is what wasmtime
/// stores per `funcref` element (pooled or not).
pub const TABLE_ELEMENT_BYTES: usize = std::mem::size_of::<usize>();

/// Most linear memories one plugin instance (all its core instances together) may have.
pub const MAX_MEMORIES: usize = 16;

/// Most tables one plugin instance may have.
pub const MAX_TABLES: usize = 64;

/// Most elements one table may have (also the pooled table slots' size).
pub const MAX_TABLE_ELEMENTS: usize = 200_000;

/// Most core instances one plugin instance may create.
const MAX_CORE_INSTANCES: usize = 64;

/// The engine shared by every plugin, and the thread that drives its epoch.
pub struct Sandbox {
    engine: Engine,
    stop_ticker: Arc<AtomicBool>,
    cache: Option<ComponentCache>,
    admission: Arc<Admission>,
}

/// A compiled component and where it came from.
pub struct Compiled {
    /// The component, ready to link.
    pub component: Component,
    /// `sha256:<hex>` of the file's bytes: names the exact plugin version in dead-letter
    /// headers and logs.
    pub hash: String,
    /// Whether it was loaded from the on-disk cache instead of compiled.
    pub cached: bool,
}

impl Sandbox {
    /// Creates the engine with fuel and epoch interruption on, the pooling allocator if
    /// configured and possible (its slots sized for `largest_memory_mib`), and the cache.
    pub fn new(config: &SandboxConfig, largest_memory_mib: u32) -> Result<Sandbox, String> {
        let pool_memory_mib = largest_memory_mib.max(64);
        let (engine, pooled) = if config.pooling {
            match Engine::new(&engine_config(Some((
                config.max_instances,
                pool_memory_mib,
            )))) {
                Ok(engine) => (engine, true),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot reserve the plugin instance pool; allocating instances on demand");
                    (new_engine(None)?, false)
                }
            }
        } else {
            (new_engine(None)?, false)
        };
        let cache = if config.cache {
            match ComponentCache::open(config.cache_dir.clone(), &engine) {
                Ok(cache) => Some(cache),
                Err(message) => {
                    tracing::warn!("compiled-plugin cache disabled: {message}");
                    None
                }
            }
        } else {
            None
        };
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
        Ok(Sandbox {
            engine,
            stop_ticker,
            cache,
            admission: Arc::new(Admission {
                capacity: config.max_instances,
                used: AtomicU32::new(0),
                pooled,
                pool_memory_mib,
            }),
        })
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
        if let Some(cache) = &self.cache {
            if let Some(component) = cache.load(&self.engine, &hash) {
                return Ok(Compiled {
                    component,
                    hash,
                    cached: true,
                });
            }
        }
        let component = Component::new(&self.engine, bytes).map_err(|err| format!("{err:#}"))?;
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

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

/// Admission control in front of the instance pool: counts live instances against
/// `sandbox.max_instances`.
pub struct Admission {
    capacity: u32,
    used: AtomicU32,
    pooled: bool,
    pool_memory_mib: u32,
}

impl Admission {
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

fn new_engine(pool: Option<(u32, u32)>) -> Result<Engine, String> {
    Engine::new(&engine_config(pool)).map_err(|err| format!("cannot create engine: {err}"))
}

/// The engine settings; `pool` is (instances, MiB per memory) for the pooling allocator.
fn engine_config(pool: Option<(u32, u32)>) -> Config {
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

/// One admitted instance; frees its slot when dropped.
pub struct Slot(Arc<Admission>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Compiled components on disk, named `<sha256>-<engine>.cwasm`.
///
/// Loading a compiled component runs native code from the file, so only files tidegate
/// wrote itself are loaded: the folder must belong to this user and be private to it
/// (checked at start), and each file must belong to this user and be writable by no one
/// else. A file that fails to load is recompiled and overwritten.
struct ComponentCache {
    dir: PathBuf,
    engine_key: String,
    uid: u32,
}

impl ComponentCache {
    fn open(dir: Option<PathBuf>, engine: &Engine) -> Result<ComponentCache, String> {
        let dir = match dir {
            Some(dir) => dir,
            None => std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
                .ok_or("neither XDG_CACHE_HOME nor HOME is set; set sandbox.cache_dir")?
                .join("tidegate")
                .join("compiled"),
        };
        std::fs::create_dir_all(&dir)
            .map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
        let uid = std::fs::metadata("/proc/self")
            .map_err(|err| format!("cannot tell this process's user: {err}"))?
            .uid();
        let meta = std::fs::metadata(&dir)
            .map_err(|err| format!("cannot read {}: {err}", dir.display()))?;
        if meta.uid() != uid {
            return Err(format!(
                "{} belongs to another user; compiled code is loaded only from a folder of \
                 tidegate's own user",
                dir.display()
            ));
        }
        if meta.mode() & 0o077 != 0 {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|err| format!("cannot make {} private: {err}", dir.display()))?;
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(ComponentCache {
            dir,
            engine_key: format!("{:016x}", hasher.finish()),
            uid,
        })
    }

    fn path(&self, hash: &str) -> PathBuf {
        let hex = hash.trim_start_matches("sha256:");
        self.dir.join(format!("{hex}-{}.cwasm", self.engine_key))
    }

    fn load(&self, engine: &Engine, hash: &str) -> Option<Component> {
        let path = self.path(hash);
        let meta = std::fs::symlink_metadata(&path).ok()?;
        if !meta.is_file() || meta.uid() != self.uid || meta.mode() & 0o022 != 0 {
            tracing::warn!(file = %path.display(), "ignoring a compiled plugin tidegate did not write");
            return None;
        }
        // SAFETY: the file was written by `store` below from `Component::serialize` (it
        // belongs to this user, in a folder private to this user, and is not writable by
        // anyone else), and wasmtime checks that it matches this engine's version and
        // settings before using it.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(component) => Some(component),
            Err(err) => {
                tracing::warn!(file = %path.display(), error = %err, "cached plugin unusable; recompiling");
                None
            }
        }
    }

    fn store(&self, hash: &str, component: &Component) {
        let result = component
            .serialize()
            .map_err(|err| err.to_string())
            .and_then(|bytes| {
                let path = self.path(hash);
                let temp = path.with_extension(format!("tmp{}", std::process::id()));
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&temp)
                    .map_err(|err| err.to_string())?;
                file.write_all(&bytes).map_err(|err| err.to_string())?;
                std::fs::rename(&temp, &path).map_err(|err| err.to_string())
            });
        if let Err(err) = result {
            tracing::warn!(dir = %self.dir.display(), error = %err, "cannot cache compiled plugin");
        }
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
    footprint: Footprint,
    log: LogBudget,
    wasi: WasiCtx,
    table: ResourceTable,
    _slot: Slot,
}

impl PluginState {
    /// Bytes of memories and tables the instance holds now (they never shrink, so this is
    /// also its peak): what counts against `limits.memory_mib`.
    pub fn memory_peak(&self) -> usize {
        self.footprint.used
    }

    /// The log budget of the current call.
    pub fn log_budget(&mut self) -> &mut LogBudget {
        &mut self.log
    }
}

/// What one call may write to the log: `limits.log_lines_per_call` lines and
/// `limits.log_bytes_per_call` bytes of messages. Past either, the rest of the call's
/// output is counted and suppressed (a line crossing the byte budget is cut at it).
pub struct LogBudget {
    max_lines: u32,
    max_bytes: usize,
    lines: u32,
    bytes: usize,
    suppressed_lines: u32,
    suppressed_bytes: usize,
}

impl LogBudget {
    /// The part of `message` that fits the budget (all of it, a prefix cut at a character
    /// boundary, or `None`), counting what does not.
    pub fn admit<'a>(&mut self, message: &'a str) -> Option<&'a str> {
        let room = self.max_bytes.saturating_sub(self.bytes);
        if self.lines >= self.max_lines || room == 0 {
            self.suppressed_lines += 1;
            self.suppressed_bytes += message.len();
            return None;
        }
        let mut end = message.len().min(room);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        self.lines += 1;
        self.bytes += end;
        self.suppressed_bytes += message.len() - end;
        Some(&message[..end])
    }

    /// Lines and bytes suppressed since the last call of this, and a fresh budget.
    pub fn take_suppressed(&mut self) -> (u32, usize) {
        self.lines = 0;
        self.bytes = 0;
        (
            std::mem::take(&mut self.suppressed_lines),
            std::mem::take(&mut self.suppressed_bytes),
        )
    }
}

/// The resource limiter of a plugin's store: counts the bytes of every linear memory and
/// table of the instance (all its core instances together) against one cap, and turns any
/// refused or failed growth into a trap.
///
/// wasmtime asks it before creating each memory or table (`current` 0, `desired` the
/// declared minimum) and before each growth, so the sum of the approved sizes is what the
/// instance holds: memories and tables never shrink. (A growth approved here that wasmtime
/// then refuses, past a memory's own declared maximum, traps and ends the instance; its
/// bytes stay in the instance's peak.)
struct Footprint {
    cap: usize,
    used: usize,
}

/// A memory or table request past the plugin's limits: a trap of kind `memory`.
#[derive(Debug)]
pub struct LimitExceeded(String);

impl std::fmt::Display for LimitExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LimitExceeded {}

impl Footprint {
    fn grow(&mut self, what: &str, bytes: usize) -> wasmtime::Result<bool> {
        let total = self.used.saturating_add(bytes);
        if total > self.cap {
            return Err(LimitExceeded(format!(
                "growing {what} would bring the instance's memories and tables to {total} \
                 bytes, over its cap of {} MiB (limits.memory_mib)",
                self.cap / (1024 * 1024)
            ))
            .into());
        }
        self.used = total;
        Ok(true)
    }
}

/// A growth that failed after the limiter approved it (past a memory's declared maximum):
/// a trap too, like every refused growth.
fn grow_failed(what: &str, error: wasmtime::Error) -> wasmtime::Result<()> {
    Err(LimitExceeded(format!("growing {what} failed: {error}")).into())
}

impl wasmtime::ResourceLimiter for PluginState {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.footprint
            .grow("memory", desired.saturating_sub(current))
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > MAX_TABLE_ELEMENTS {
            return Err(LimitExceeded(format!(
                "a table of {desired} elements is over the limit of {MAX_TABLE_ELEMENTS} per table"
            ))
            .into());
        }
        let elements = desired.saturating_sub(current);
        self.footprint
            .grow("a table", elements.saturating_mul(TABLE_ELEMENT_BYTES))
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        grow_failed("memory", error)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        grow_failed("a table", error)
    }

    fn instances(&self) -> usize {
        MAX_CORE_INSTANCES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }
}

/// What a component declares before it runs: the sum of its core modules' initial memory
/// and table sizes (each module counted once), and how many memories and tables they
/// define. A lower bound of what instantiating it takes, checked before compiling so that
/// a component that can never fit is refused naming the cap, whichever allocator is used.
pub fn check_declared(bytes: &[u8], limits: &PluginLimits) -> Result<(), String> {
    let cap = limits.memory_mib as u64 * 1024 * 1024;
    let (mut memories, mut tables, mut total) = (0usize, 0usize, 0u64);
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        // Malformed input is left to the compiler, which says what is wrong with it.
        let Ok(payload) = payload else { return Ok(()) };
        match payload {
            wasmparser::Payload::MemorySection(section) => {
                for memory in section.into_iter().flatten() {
                    memories += 1;
                    let page = 1u64 << memory.page_size_log2.unwrap_or(16);
                    total = total.saturating_add(memory.initial.saturating_mul(page));
                }
            }
            wasmparser::Payload::TableSection(section) => {
                for table in section.into_iter().flatten() {
                    tables += 1;
                    let elements = table.ty.initial;
                    if elements > MAX_TABLE_ELEMENTS as u64 {
                        return Err(format!(
                            "declares a table of {elements} elements; the limit is \
                             {MAX_TABLE_ELEMENTS} per table"
                        ));
                    }
                    total = total.saturating_add(elements * TABLE_ELEMENT_BYTES as u64);
                }
            }
            _ => {}
        }
    }
    if memories > MAX_MEMORIES || tables > MAX_TABLES {
        return Err(format!(
            "declares {memories} memories and {tables} tables; a plugin may have at most \
             {MAX_MEMORIES} memories and {MAX_TABLES} tables"
        ));
    }
    if total > cap {
        return Err(format!(
            "its memories and tables start at {total} bytes, over its cap of {} MiB \
             (limits.memory_mib)",
            limits.memory_mib
        ));
    }
    Ok(())
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// What a plugin is allowed beyond its own memory, as a WASI context. Without grants:
/// no preopened folders, an empty environment and no arguments, stdio closed, every socket
/// address and name lookup denied (wasmtime-wasi's defaults), the clocks stopped at the
/// Unix epoch and a fixed random stream, so a plugin's verdict cannot depend on when or
/// how often an event is replayed.
pub fn wasi_context(capabilities: &Capabilities) -> Result<WasiCtx, String> {
    let mut builder = WasiCtxBuilder::new();
    for name in &capabilities.env {
        if let Ok(value) = std::env::var(name) {
            builder.env(name, value);
        }
    }
    for dir in &capabilities.read_dirs {
        let guest = dir.to_string_lossy();
        builder
            .preopened_dir(dir, guest.as_ref(), FsPerms::ReadOnly)
            .map_err(|err| format!("cannot open granted folder {}: {err}", dir.display()))?;
    }
    if !capabilities.clock {
        builder
            .wall_clock(StoppedClock)
            .monotonic_clock(StoppedClock);
    }
    if !capabilities.random {
        builder
            .secure_random(wasmtime_wasi::Deterministic::new(vec![42; 32]))
            .insecure_random(wasmtime_wasi::Deterministic::new(vec![42; 32]))
            .insecure_random_seed(42);
    }
    Ok(builder.build())
}

/// The clock a plugin without the `clock` capability sees.
struct StoppedClock;

impl wasmtime_wasi::HostWallClock for StoppedClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl wasmtime_wasi::HostMonotonicClock for StoppedClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

/// A fresh store for one plugin instance, with its memory cap and capabilities installed;
/// `scope` is the (unit, tenant) running it, for its log lines.
pub fn new_store(
    engine: &Engine,
    plugin: &str,
    scope: (&str, Option<&str>),
    config: &BTreeMap<String, String>,
    limits: &PluginLimits,
    wasi: WasiCtx,
    slot: Slot,
) -> Store<PluginState> {
    let state = PluginState {
        plugin: plugin.to_string(),
        pipeline: scope.0.to_string(),
        tenant: scope.1.map(str::to_string),
        config: config.clone(),
        footprint: Footprint {
            cap: limits.memory_mib as usize * 1024 * 1024,
            used: 0,
        },
        log: LogBudget {
            max_lines: limits.log_lines_per_call,
            max_bytes: limits.log_bytes_per_call as usize,
            lines: 0,
            bytes: 0,
            suppressed_lines: 0,
            suppressed_bytes: 0,
        },
        wasi,
        table: ResourceTable::new(),
        _slot: slot,
    };
    let mut store = Store::new(engine, state);
    store.limiter(|state| state);
    store
}

/// Gives the next call its full fuel and a fresh deadline.
pub fn arm(store: &mut Store<PluginState>, limits: &PluginLimits) -> Result<(), String> {
    store
        .set_fuel(limits.fuel_per_call)
        .map_err(|err| format!("cannot set fuel: {err}"))?;
    let ticks = limits
        .timeout_ms
        .div_ceil(EPOCH_TICK.as_millis() as u64)
        .max(1);
    store.set_epoch_deadline(ticks);
    Ok(())
}

/// Fuel burnt by the last call.
pub fn fuel_used(store: &Store<PluginState>, limits: &PluginLimits) -> u64 {
    limits
        .fuel_per_call
        .saturating_sub(store.get_fuel().unwrap_or(0))
}

/// A short, stable reason for a failed call, used in dead-letter headers and counters:
/// `out-of-fuel`, `deadline`, `memory: <which limit>`, or `trap: <message>`.
pub fn trap_reason(err: &wasmtime::Error) -> String {
    if let Some(limit) = err.downcast_ref::<LimitExceeded>() {
        return format!("memory: {limit}");
    }
    match err.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => "out-of-fuel".to_string(),
        Some(Trap::Interrupt) => "deadline".to_string(),
        // The trap alone reads better than the backtrace that wraps it.
        Some(trap) => format!("trap: {trap}"),
        None => {
            let text = format!("{err:#}");
            if text.contains("growing memory") || text.contains("memory minimum size") {
                "memory".to_string()
            } else {
                format!("trap: {}", text.replace(['\r', '\n'], " "))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The smallest valid component: the header alone.
    const EMPTY_COMPONENT: &[u8] = b"\0asm\x0d\x00\x01\x00";

    fn sandbox(dir: &Path) -> Sandbox {
        let config = SandboxConfig {
            cache_dir: Some(dir.to_path_buf()),
            pooling: false,
            ..SandboxConfig::default()
        };
        Sandbox::new(&config, 64).expect("sandbox")
    }

    /// A second start loads what the first compiled; a file someone else could have written
    /// is never loaded, only recompiled and replaced.
    #[test]
    fn cache_loads_only_its_own_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = sandbox(dir.path())
            .compile(EMPTY_COMPONENT)
            .expect("compile");
        assert!(!first.cached);
        assert!(first.hash.starts_with("sha256:"));
        let again = sandbox(dir.path())
            .compile(EMPTY_COMPONENT)
            .expect("compile");
        assert!(again.cached);
        assert_eq!(again.hash, first.hash);

        let file = std::fs::read_dir(dir.path())
            .expect("read cache")
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "cwasm"))
            .expect("a cached file");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        let writable = sandbox(dir.path())
            .compile(EMPTY_COMPONENT)
            .expect("compile");
        assert!(!writable.cached, "a world-writable file is not trusted");
        let meta = std::fs::metadata(&file).expect("rewritten");
        assert_eq!(meta.mode() & 0o077, 0, "rewritten private");
        assert!(
            sandbox(dir.path())
                .compile(EMPTY_COMPONENT)
                .expect("compile")
                .cached
        );

        // Owned by someone else (the test may run as root, which can chown).
        if std::os::unix::fs::chown(&file, Some(65534), None).is_ok() {
            let foreign = sandbox(dir.path())
                .compile(EMPTY_COMPONENT)
                .expect("compile");
            assert!(!foreign.cached, "a file of another user is not trusted");
        }
        // Garbage in place of a compiled file is recompiled, not trusted.
        std::fs::write(&file, b"garbage").expect("write");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(
            !sandbox(dir.path())
                .compile(EMPTY_COMPONENT)
                .expect("compile")
                .cached
        );
    }

    /// Admission refuses instances past `max_instances` and frees slots on drop.
    #[test]
    fn admission_is_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = SandboxConfig {
            cache_dir: Some(dir.path().to_path_buf()),
            max_instances: 2,
            ..SandboxConfig::default()
        };
        let sandbox = Sandbox::new(&config, 64).expect("sandbox");
        let admission = sandbox.admission();
        let limits = PluginLimits::default();
        let a = admission.admit(&limits).expect("first");
        let _b = admission.admit(&limits).expect("second");
        let err = admission.admit(&limits).err().expect("third is refused");
        assert!(err.contains("sandbox.max_instances"), "{err}");
        drop(a);
        assert!(admission.admit(&limits).is_ok());
        if sandbox.is_pooled() {
            let big = PluginLimits {
                memory_mib: 1024,
                ..limits
            };
            let err = admission.admit(&big).err().expect("larger than the pool");
            assert!(err.contains("restart"), "{err}");
        }
    }
}
