//! A global allocator that bounds each allocation by the size of the input being run, so that a
//! file that claims a huge count and allocates it is a crash (libFuzzer saves the input), not a
//! slow run that happens to fit in memory.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The largest single allocation allowed while an input runs (`usize::MAX` outside a run).
static LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);

/// A fixed allowance for what does not scale with the input (tables, thread pools, buffers).
pub const BASE_BYTES: usize = 32 << 20;

/// Bytes allowed per byte of input: parsing expands a file by a bounded factor (a GGUF array
/// element of one byte becomes a 32-byte value, a Q4 block of 18 bytes becomes 128 bytes of f32),
/// never by a count the file states.
pub const BYTES_PER_INPUT_BYTE: usize = 64;

/// Sets the allocation bound for an input of `len` bytes. Call first in every target.
pub fn bound_allocations(len: usize) {
    let limit = len
        .saturating_mul(BYTES_PER_INPUT_BYTE)
        .saturating_add(BASE_BYTES);
    LIMIT.store(limit, Ordering::Relaxed);
}

/// Lifts the bound (between inputs, in a test that replays several).
pub fn unbound_allocations() {
    LIMIT.store(usize::MAX, Ordering::Relaxed);
}

/// [`System`], aborting on an allocation above the bound [`bound_allocations`] set.
pub struct BoundedAlloc;

fn check(size: usize) {
    if size > LIMIT.load(Ordering::Relaxed) {
        // No allocation from here on: stderr is unbuffered and the message is static.
        let _ = std::io::stderr()
            .write_all(b"\n==ape-attn-fuzz== allocation above the input's bound (a count taken from the input?)\n");
        std::process::abort();
    }
}

// SAFETY: every call is forwarded to `System` unchanged, after a check that only reads an atomic.
unsafe impl GlobalAlloc for BoundedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: the caller's contract for `layout` is `System::alloc`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        // SAFETY: `ptr` came from `System` with this `layout`; the caller's contract holds.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
