//! The wasm sandbox: one shared engine, and the limits every plugin call runs under.
//!
//! - **Fuel** bounds the CPU of one call deterministically: a replayed event gets the same
//!   verdict, which a wall-clock limit alone cannot promise.
//! - **Epochs** bound its wall-clock time as a backstop (a host call that blocks, a
//!   pathological compile of a loop): a ticker thread advances the engine's epoch every
//!   [`EPOCH_TICK`], and each call gets a deadline in ticks.
//! - **Memory** is capped per instance by a [`StoreLimits`] that traps on failed growth, so a
//!   memory bomb is a trap with a reason rather than an allocation failure the guest ignores.
//!
//! A store whose call trapped is never reused: the plugin gets a fresh instance for the next
//! event (see `plugin::Plugin`).
//!
//! Plugins get no WASI at all: the only imports a linker offers are `log` and `config`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder, Trap};

use crate::config::PluginLimits;

/// How often the epoch advances; call deadlines are rounded up to it.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Most log lines one plugin call may write; the rest are counted and dropped, so a chatty
/// plugin cannot flood the host's log.
pub const MAX_LOG_LINES_PER_CALL: u32 = 32;

/// The engine shared by every plugin, and the thread that drives its epoch.
pub struct Sandbox {
    engine: Engine,
    stop_ticker: Arc<AtomicBool>,
}

impl Sandbox {
    /// Creates the engine with fuel and epoch interruption on.
    pub fn new() -> Result<Sandbox, String> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.consume_fuel(true);
        config.epoch_interruption(true);
        let engine = Engine::new(&config).map_err(|err| format!("cannot create engine: {err}"))?;
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
        })
    }

    /// The shared engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }
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
    /// The plugin's own config (what its `config` import returns).
    pub config: BTreeMap<String, String>,
    limits: StoreLimits,
    log_lines: u32,
    log_dropped: u32,
}

impl PluginState {
    /// How many log lines the current call tried to write past [`MAX_LOG_LINES_PER_CALL`].
    pub fn take_dropped_log_lines(&mut self) -> u32 {
        self.log_lines = 0;
        std::mem::take(&mut self.log_dropped)
    }

    /// Counts one log line; false when the per-call cap is reached.
    pub fn admit_log_line(&mut self) -> bool {
        if self.log_lines >= MAX_LOG_LINES_PER_CALL {
            self.log_dropped += 1;
            return false;
        }
        self.log_lines += 1;
        true
    }
}

/// A fresh store for one plugin instance, with its memory cap installed.
pub fn new_store(
    engine: &Engine,
    plugin: &str,
    config: &BTreeMap<String, String>,
    limits: &PluginLimits,
) -> Store<PluginState> {
    let state = PluginState {
        plugin: plugin.to_string(),
        config: config.clone(),
        limits: StoreLimitsBuilder::new()
            .memory_size(limits.memory_mib as usize * 1024 * 1024)
            .instances(16)
            .tables(64)
            .memories(4)
            .trap_on_grow_failure(true)
            .build(),
        log_lines: 0,
        log_dropped: 0,
    };
    let mut store = Store::new(engine, state);
    store.limiter(|state| &mut state.limits);
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
/// `out-of-fuel`, `deadline`, `memory`, or `trap: <message>`.
pub fn trap_reason(err: &wasmtime::Error) -> String {
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
