//! Helpers shared by the fuzz targets: an allocator that turns any oversized
//! allocation into a crash, and a deterministic chunker.
//!
//! Every target links this crate, so the allocator guards them all. libFuzzer's
//! own `-malloc_limit_mb` needs sanitizer malloc hooks, which a build with
//! `--sanitizer none` does not have; this check works with and without ASan.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// Largest single allocation a target may make. The parsers run with limits
/// of at most 70,000 bytes per message on inputs of a few KiB, so anything
/// near this means a size was taken from the input without a bound.
pub const MAX_ALLOCATION: usize = 16 << 20;

/// Most bytes live at once (leaks or unbounded buffering across a run).
pub const MAX_LIVE: usize = 256 << 20;

struct Guard;

static LIVE: AtomicUsize = AtomicUsize::new(0);

fn over_limit(what: &[u8]) -> ! {
    // No allocation here: we are inside the allocator.
    let _ = std::io::stderr().write_all(what);
    std::process::abort()
}

// SAFETY: forwards to the system allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Guard {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: same layout as given to us.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: same layout as given to us.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Relaxed);
        // SAFETY: `ptr` was allocated by `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_sub(layout.size(), Relaxed);
        check(new_size);
        // SAFETY: `ptr` was allocated by `System` with this layout.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn check(size: usize) {
    if size > MAX_ALLOCATION {
        over_limit(b"\n==fuzz== single allocation over MAX_ALLOCATION (unbounded allocation)\n");
    }
    if LIVE.fetch_add(size, Relaxed) + size > MAX_LIVE {
        over_limit(b"\n==fuzz== live heap over MAX_LIVE (unbounded buffering or a leak)\n");
    }
}

#[global_allocator]
static GUARD: Guard = Guard;

/// Splits `data` into chunks whose sizes come from `seed` (xorshift), the
/// way reads from a socket split a stream: every chunk is non-empty and their
/// concatenation is `data`. The seed's low bits pick the largest chunk size.
pub fn chunks(data: &[u8], seed: u8) -> Vec<&[u8]> {
    let max = match seed & 3 {
        0 => 1,
        1 => 3,
        2 => 17,
        _ => 200,
    };
    let mut x = u32::from(seed) | 0x9e37_7900;
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let n = (1 + x as usize % max).min(rest.len());
        let (a, b) = rest.split_at(n);
        out.push(a);
        rest = b;
    }
    out
}
