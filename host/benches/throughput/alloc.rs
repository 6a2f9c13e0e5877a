//! The bench process's global allocator: mimalloc, as the `tidegate` binary
//! (host/src/main.rs), unless `TIDEGATE_BENCH_ALLOC=system` picks glibc's malloc, so that one
//! build measures both back to back. tidegate runs in-process here, so the raw clients of
//! scenarios 1–2 use the same allocator as tidegate: the ratios compare like with like.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU8, Ordering};

use mimalloc::MiMalloc;

/// Not decided yet, mimalloc, glibc.
const UNKNOWN: u8 = 0;
const MIMALLOC: u8 = 1;
const SYSTEM: u8 = 2;

/// Decided on the first allocation and never changed: a block is always freed by the
/// allocator that made it.
static CHOICE: AtomicU8 = AtomicU8::new(UNKNOWN);

/// The environment is read with `getenv`, which does not allocate (this runs inside the
/// first allocation). Threads racing here read the same variable and agree.
fn choice() -> u8 {
    let known = CHOICE.load(Ordering::Relaxed);
    if known != UNKNOWN {
        return known;
    }
    // SAFETY: a NUL-terminated name; the value is only read, before anything can set it.
    let value = unsafe { libc::getenv(c"TIDEGATE_BENCH_ALLOC".as_ptr()) };
    // SAFETY: getenv returns NULL or a NUL-terminated string.
    let system = !value.is_null() && unsafe { std::ffi::CStr::from_ptr(value) } == c"system";
    let decided = if system { SYSTEM } else { MIMALLOC };
    CHOICE.store(decided, Ordering::Relaxed);
    decided
}

/// The name of the allocator in use, for the results.
pub fn name() -> &'static str {
    if choice() == SYSTEM {
        "glibc malloc (TIDEGATE_BENCH_ALLOC=system)"
    } else {
        "mimalloc"
    }
}

pub struct BenchAlloc;

// SAFETY: every call goes to one of two sound allocators, the same one for a block's whole
// life (`CHOICE` never changes once set).
unsafe impl GlobalAlloc for BenchAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        unsafe {
            if choice() == SYSTEM {
                System.alloc(layout)
            } else {
                MiMalloc.alloc(layout)
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        unsafe {
            if choice() == SYSTEM {
                System.alloc_zeroed(layout)
            } else {
                MiMalloc.alloc_zeroed(layout)
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on; `ptr` came from the same allocator.
        unsafe {
            if choice() == SYSTEM {
                System.dealloc(ptr, layout)
            } else {
                MiMalloc.dealloc(ptr, layout)
            }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract, passed on; `ptr` came from the same allocator.
        unsafe {
            if choice() == SYSTEM {
                System.realloc(ptr, layout, new_size)
            } else {
                MiMalloc.realloc(ptr, layout, new_size)
            }
        }
    }
}
