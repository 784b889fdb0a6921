//! The GPU forward pass ([`GpuModel`] on [`EmulatedOps`]: the crate's kernels on the kernel
//! emulator, GEMMs on the CPU as cuBLAS defines them) against the CPU forward pass: the cases of
//! `tests/common/llama.rs`, which the GPU runs in `tests/gpu_llama.rs`. Kernel launches cycle
//! through the emulator's four schedules.
//!
//! [`GpuModel`]: ape_llama::gpu::GpuModel

mod common;
#[path = "common/llama.rs"]
mod llama;

use ape_attn::{RopeConfig, RopeLayout};
use ape_llama::config::LlamaConfig;
use {ape_attn::emulator::EmulatorOptions, ape_llama::emulated_ops::EmulatedOps};

fn ops() -> EmulatedOps {
    EmulatedOps::cycling(EmulatorOptions::default())
}

#[test]
fn emulated_forward_matches_cpu_forward() {
    llama::forward_matches_cpu_forward(ops());
}

#[test]
fn the_four_modes_and_decode_match_on_the_emulator() {
    llama::the_four_modes_and_decode_match(ops());
}

#[test]
fn shifted_blocks_match_when_grown_and_merged() {
    llama::shifted_blocks_match_when_grown_and_merged(ops());
}

#[test]
fn a_batch_matches_each_sequence_alone_on_the_emulator() {
    llama::forward_batch_matches_forward_alone(ops());
}

#[test]
fn batched_decode_matches_decode_alone_on_the_emulator() {
    llama::decode_batch_matches_decode_alone(ops());
}

/// One schedule throughout: the comparison is bit for bit.
#[test]
fn stored_blocks_answer_as_encoded_ones_on_the_emulator() {
    let g = llama::small_model_with_window(4096);
    llama::stored_blocks_answer_as_encoded_ones(
        || llama::load(EmulatedOps::new(EmulatorOptions::default()), &g),
        "emulator",
    );
}

/// Llama-3-8B's attention shape (head dim 128, GQA 4, NeoX RoPE at base 500000) at a width the
/// emulator runs in seconds.
#[test]
fn synthetic_llama3_shaped_layers_run() {
    let rope = RopeConfig::new(128, 500_000.0, RopeLayout::Neox).expect("rope");
    let cfg = LlamaConfig {
        dim: 512,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 1,
        head_dim: 128,
        hidden_dim: 1792,
        vocab_size: 16_032,
        rms_eps: 1e-5,
        rope,
        context_length: 131_072,
    };
    llama::synthetic_model_runs(ops(), cfg);
}

/// The default real model (fetched by the test command).
#[test]
fn emulated_forward_matches_cpu_on_the_real_model() {
    llama::forward_matches_cpu_on_the_real_model(ops(), &common::default_model());
}
