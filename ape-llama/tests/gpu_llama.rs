//! The GPU forward pass against the CPU forward pass on a GPU (needs a CUDA device): a synthetic
//! model in GGUF form, the four modes through the engine, decode through chunked blocks,
//! synthetic Llama-3-8B-shaped layers, and the real model when `APE_MODEL` names it. The cases are
//! in `tests/common/llama.rs`, shared with the kernel emulator's run (`tests/emulated_llama.rs`).

mod common;
#[path = "common/llama.rs"]
mod llama;

use std::sync::Arc;

use ape_attn::cuda::Device;
use ape_attn::{RopeConfig, RopeLayout};
use ape_llama::config::LlamaConfig;
use ape_llama::gpu::CudaOps;

fn ops() -> CudaOps {
    let dev = Arc::new(Device::new(0).expect("a CUDA device with the kernels built"));
    CudaOps::new(dev).expect("cuBLAS")
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_forward_matches_cpu_forward() {
    llama::forward_matches_cpu_forward(ops());
}

#[test]
#[ignore = "needs a CUDA device"]
fn the_four_modes_and_decode_match_on_the_gpu() {
    llama::the_four_modes_and_decode_match(ops());
}

#[test]
#[ignore = "needs a CUDA device"]
fn shifted_blocks_match_when_grown_and_merged() {
    llama::shifted_blocks_match_when_grown_and_merged(ops());
}

#[test]
#[ignore = "needs a CUDA device"]
fn a_batch_matches_each_sequence_alone_on_the_gpu() {
    llama::forward_batch_matches_forward_alone(ops());
}

#[test]
#[ignore = "needs a CUDA device"]
fn batched_decode_matches_decode_alone_on_the_gpu() {
    llama::decode_batch_matches_decode_alone(ops());
}

#[test]
#[ignore = "needs a CUDA device"]
fn stored_blocks_answer_as_encoded_ones_on_the_gpu() {
    let g = llama::small_model_with_window(4096);
    llama::stored_blocks_answer_as_encoded_ones(|| llama::load(ops(), &g), "gpu");
}

#[test]
#[ignore = "needs a CUDA device"]
fn synthetic_llama3_8b_layers_run() {
    let rope = RopeConfig::new(128, 500_000.0, RopeLayout::Neox).expect("rope");
    let cfg = LlamaConfig {
        dim: 4096,
        n_layers: 2,
        n_heads: 32,
        n_kv_heads: 8,
        head_dim: 128,
        hidden_dim: 14336,
        vocab_size: 128_256,
        rms_eps: 1e-5,
        rope,
        context_length: 131_072,
    };
    llama::synthetic_model_runs(ops(), cfg);
}

/// The real model, when the GPU session carries it (APE_MODEL=path to the GGUF).
#[test]
#[ignore = "needs a CUDA device and APE_MODEL"]
fn gpu_forward_matches_cpu_on_the_real_model() {
    let path = std::env::var("APE_MODEL").expect("APE_MODEL names the GGUF model");
    llama::forward_matches_cpu_on_the_real_model(ops(), path.as_ref());
}
