//! The limits every plugin call runs under: the store's resource limiter (memory and table
//! caps), the per-call log budget, fuel and epoch deadlines, and the names of the traps they
//! cause, so a dead letter says which limit an event hit.

use std::time::Duration;

use wasmtime::component::ResourceTableError;
use wasmtime::{Store, Trap};

use super::PluginState;
use crate::config::PluginLimits;

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

/// Most WASI resources (pollables, streams, sockets, directory handles…) one plugin instance
/// may hold at once. They live in host memory, outside `limits.memory_mib`; wasmtime's own
/// cap is a million per store, which a plugin could fill in one call and keep for its
/// instance's life (tens of bytes each, host-side, times every tenant doing it). Ten
/// thousand is far more than any plugin needs: the language runtimes hold a handful.
pub const MAX_RESOURCES: usize = 10_000;

/// Most core instances one plugin instance may create.
pub(super) const MAX_CORE_INSTANCES: usize = 64;

/// Largest function body tidegate compiles, in bytes. The compiler runs in tidegate's own
/// process, beside every tenant, and the memory and time it takes grow with a function's
/// size: one body of 6.6 MB (within WebAssembly's own limit, in a 6.7 MB upload) took 22 s
/// and 2 GB to compile, and two loads compile at once. The largest body in the language
/// runtimes tidegate's examples are built with (CPython's interpreter loop, in
/// componentize-py) is 0.43 MB.
pub const MAX_FUNCTION_BYTES: usize = 1024 * 1024;

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
    /// A fresh budget of `limits.log_lines_per_call` lines and `log_bytes_per_call` bytes.
    pub(super) fn new(limits: &PluginLimits) -> LogBudget {
        LogBudget {
            max_lines: limits.log_lines_per_call,
            max_bytes: limits.log_bytes_per_call as usize,
            lines: 0,
            bytes: 0,
            suppressed_lines: 0,
            suppressed_bytes: 0,
        }
    }

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
pub(super) struct Footprint {
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
    /// Nothing held yet, against the cap of `limits.memory_mib`.
    pub(super) fn new(limits: &PluginLimits) -> Footprint {
        Footprint {
            cap: limits.memory_mib as usize * 1024 * 1024,
            used: 0,
        }
    }

    /// Bytes approved so far.
    pub(super) fn used(&self) -> usize {
        self.used
    }

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
/// Its functions' sizes are checked too, against [`MAX_FUNCTION_BYTES`]: what compiling it
/// would take.
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
            wasmparser::Payload::CodeSectionEntry(body) => {
                let size = body.range().len();
                if size > MAX_FUNCTION_BYTES {
                    return Err(format!(
                        "has a function of {size} bytes of code; tidegate compiles functions \
                         of at most {} MiB (compiling one takes memory and time in proportion \
                         to its size, in tidegate's own process): split it into smaller ones",
                        MAX_FUNCTION_BYTES / (1024 * 1024)
                    ));
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
    store.data_mut().call_ends =
        std::time::Instant::now().checked_add(Duration::from_millis(limits.timeout_ms));
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
    if let Some(wait) = err.downcast_ref::<super::WaitPastDeadline>() {
        return format!("deadline: {wait}");
    }
    if let Some(ResourceTableError::Full) = err.downcast_ref::<ResourceTableError>() {
        return format!(
            "memory: the instance holds {MAX_RESOURCES} WASI resources (pollables, streams, \
             sockets…), the most one may hold at once"
        );
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
