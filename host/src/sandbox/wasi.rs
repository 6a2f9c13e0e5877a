//! What a plugin may reach through WASI 0.2: nothing by default, so a verdict depends on
//! the event alone; grants come from the plugin's `capabilities`.

use std::time::Duration;

use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::PluginState;
use crate::config::Capabilities;

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
