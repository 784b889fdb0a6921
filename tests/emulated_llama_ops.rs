//! The Llama-op (RMSNorm, silu*up, embedding, synthetic fill) kernels (`kernels/llama_ops.cu`) on the kernel emulator against the CPU oracle: the
//! cases of `tests/common/ops.rs`, which the GPU runs in `tests/gpu_llama_ops.rs`, each launch under
//! the next of the emulator's four schedules.

mod common;
#[path = "common/ops.rs"]
mod ops;

use common::Emulated;

#[test]
fn llama_ops_match_the_oracle() {
    ops::llama_ops_match_the_oracle(&Emulated::default());
}

#[test]
fn fill_uniform_matches_the_oracle() {
    ops::fill_uniform_matches_the_oracle(&Emulated::default());
}
