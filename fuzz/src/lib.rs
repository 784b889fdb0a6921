//! The fuzz targets' bodies and the allocation bound they run under. The bodies live here, not in
//! the target files, so that `ape-llama/tests/fuzz_regressions.rs` replays saved inputs through exactly the
//! code libFuzzer ran (it includes both files by path).

pub mod bound;
pub mod targets;

pub use bound::{bound_allocations, BoundedAlloc};

/// Declares [`BoundedAlloc`] the global allocator and runs `$body` on each input with the bound
/// set for its size.
#[macro_export]
macro_rules! bounded_target {
    ($body:path) => {
        #[global_allocator]
        static ALLOC: $crate::BoundedAlloc = $crate::BoundedAlloc;

        libfuzzer_sys::fuzz_target!(|data: &[u8]| {
            $crate::bound_allocations(data.len());
            $body(data);
        });
    };
}
