//! What a plugin may reach through WASI 0.2: nothing by default, so a verdict depends on
//! the event alone; grants come from the plugin's `capabilities`.
//!
//! **Waits are bounded by the call's deadline.** A guest's `sleep` is a wait on a
//! monotonic-clock pollable, and a wait is a host call: epoch interruption stops only wasm
//! code, so wasmtime-wasi's own clock waits would block the worker running the call for as
//! long as the plugin asked, with no CPU charged to its tenant (a plugin that slept an hour
//! on one event held one of the pool's few workers an hour). tidegate replaces the two
//! monotonic-clock functions that make a wait ([`link_waits`]): without the `clock` grant the
//! plugin's clock is stopped and every wait ends at once; with it, a wait is real, and one
//! that would end past the call's deadline fails the call as a deadline at once
//! ([`WaitPastDeadline`]). The time a call spends waiting is counted
//! ([`PluginState::take_waited`]) and charged on the worker pool as CPU time: a wait holds
//! a worker as computing does. Other pollables cannot block without grants (stdin is closed,
//! every socket address is denied); reads of granted folders are the operator's choice.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::{Linker, Resource};
use wasmtime::StoreContextMut;
use wasmtime_wasi::p2::{DynPollable, Pollable};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::PluginState;
use crate::config::Capabilities;

/// The WASI interface whose waits tidegate replaces (components importing any earlier 0.2
/// version are linked to it by wasmtime's semver matching).
const MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.12";

/// A plugin's WASI context and the monotonic clock it was given.
pub struct Wasi {
    /// What the plugin reaches through WASI.
    pub ctx: WasiCtx,
    /// Where its monotonic clock starts: `None` when the clock is stopped (no `clock` grant).
    pub clock: Option<Instant>,
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
pub fn wasi_context(capabilities: &Capabilities) -> Result<Wasi, String> {
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
    // The monotonic clock is always tidegate's, so that a wait's end can be counted from it
    // (see `link_waits`).
    let clock = capabilities.clock.then(Instant::now);
    builder.monotonic_clock(MonotonicClock(clock));
    if !capabilities.clock {
        builder.wall_clock(StoppedClock);
    }
    if !capabilities.random {
        builder
            .secure_random(wasmtime_wasi::Deterministic::new(vec![42; 32]))
            .insecure_random(wasmtime_wasi::Deterministic::new(vec![42; 32]))
            .insecure_random_seed(42);
    }
    Ok(Wasi {
        ctx: builder.build(),
        clock,
    })
}

/// The wall clock a plugin without the `clock` capability sees (its monotonic clock is a
/// stopped [`MonotonicClock`]).
struct StoppedClock;

impl wasmtime_wasi::HostWallClock for StoppedClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

/// A plugin's monotonic clock: nanoseconds since it started, or stopped at 0.
struct MonotonicClock(Option<Instant>);

impl MonotonicClock {
    fn nanos(started: Option<Instant>) -> u64 {
        started.map_or(0, |started| {
            u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX)
        })
    }
}

impl wasmtime_wasi::HostMonotonicClock for MonotonicClock {
    fn resolution(&self) -> u64 {
        match self.0 {
            Some(_) => 1,
            None => 1_000_000_000,
        }
    }
    fn now(&self) -> u64 {
        MonotonicClock::nanos(self.0)
    }
}

/// A wait a plugin asked for that would have ended past its call's deadline: the call fails
/// as a deadline (see the module docs).
#[derive(Debug)]
pub struct WaitPastDeadline {
    asked: Duration,
    left: Duration,
}

impl std::fmt::Display for WaitPastDeadline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the plugin asked to wait {:?} with {:?} left before its deadline \
             (limits.timeout_ms)",
            self.asked, self.left
        )
    }
}

impl std::error::Error for WaitPastDeadline {}

/// A wait's pollable: ready at `end`, or at once. The time it blocks is added to `waited`
/// (the store's count, in nanoseconds).
struct Wait {
    end: Option<tokio::time::Instant>,
    waited: Arc<AtomicU64>,
}

impl Pollable for Wait {
    fn ready<'a, 'b>(&'a mut self) -> Pin<Box<dyn Future<Output = ()> + Send + 'b>>
    where
        'a: 'b,
        Self: 'b,
    {
        let (end, waited) = (self.end, self.waited.clone());
        Box::pin(async move {
            let Some(end) = end else { return };
            let started = Instant::now();
            tokio::time::sleep_until(end).await;
            let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            waited.fetch_add(nanos, Ordering::Relaxed);
        })
    }
}

/// Replaces wasmtime-wasi's `subscribe-duration` and `subscribe-instant` in `linker` (which
/// must already hold WASI) with waits bounded as the module docs say.
pub fn link_waits(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut clock = linker.instance(MONOTONIC_CLOCK)?;
    clock.func_wrap(
        "subscribe-duration",
        |mut store: StoreContextMut<'_, PluginState>, (nanos,): (u64,)| {
            Ok((subscribe_wait(
                store.data_mut(),
                Duration::from_nanos(nanos),
            )?,))
        },
    )?;
    clock.func_wrap(
        "subscribe-instant",
        |mut store: StoreContextMut<'_, PluginState>, (when,): (u64,)| {
            let state = store.data_mut();
            let now = MonotonicClock::nanos(state.clock);
            let wait = Duration::from_nanos(when.saturating_sub(now));
            Ok((subscribe_wait(state, wait)?,))
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// A pollable for a wait of `asked` by `state`'s plugin, or the error that fails its call.
fn subscribe_wait(
    state: &mut PluginState,
    asked: Duration,
) -> wasmtime::Result<Resource<DynPollable>> {
    let end = match state.clock {
        // A stopped clock: no time passes, nothing to wait for.
        None => None,
        Some(_) => {
            let now = Instant::now();
            let left = state
                .call_ends
                .map_or(Duration::MAX, |ends| ends.saturating_duration_since(now));
            if asked > left {
                return Err(WaitPastDeadline { asked, left }.into());
            }
            Some(tokio::time::Instant::from_std(now + asked))
        }
    };
    let waited = state.waited.clone();
    let wait = state.table.push(Wait { end, waited })?;
    wasmtime_wasi::p2::subscribe(&mut state.table, wait)
}
