//! The Llama-op (RMSNorm, silu*up, embedding, synthetic fill) kernels (`kernels/llama_ops.cu`) against the CPU oracle on a GPU (needs a CUDA
//! device). The cases are in `tests/common/ops.rs`, shared with the kernel emulator's run of the
//! same kernels (`tests/emulated_llama_ops.rs`).

mod common;
#[path = "common/ops.rs"]
mod ops;

use common::Gpu;

#[test]
#[ignore = "needs a CUDA device"]
fn llama_ops_match_the_oracle() {
    ops::llama_ops_match_the_oracle(&Gpu::new());
}

#[test]
#[ignore = "needs a CUDA device"]
fn fill_uniform_matches_the_oracle() {
    ops::fill_uniform_matches_the_oracle(&Gpu::new());
}
