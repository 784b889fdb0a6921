//! # ape-llama
//!
//! A minimal Llama on [`ape_attn`]'s kernels, for context-augmented generation: passages encoded
//! once, their K/V kept in a [`cache`] of blocks, and the question answered over them in one of
//! four modes ([`engine::Mode`]: sequential, parallel, APE, Block-Attention).
//!
//! - Model files: [`open`] detects the format (GGUF, [`gguf`]; a Hugging Face folder, [`hf`]) and
//!   reads the [`config`], the [`tokenizer`] and the [`weights`] ([`quant`]: the GGUF block
//!   formats).
//! - Forward passes: [`cpu`] (f32, the model's oracle) and [`gpu`], written once against
//!   [`gpu::DeviceOps`]: [`gpu::CudaOps`] runs it on a CUDA device with ape-attn's kernels and
//!   cuBLAS, `emulated_ops::EmulatedOps` (feature `emulator`) on ape-attn's kernel emulator.
//!   [`model::LlamaModel`] is what both offer the [`engine`].
//! - [`engine`]: prompts of passages and a question, the block cache, prefill and decode in each
//!   mode; [`eval`]: how much of sequential encoding's quality each mode keeps, and the search for
//!   APE's `T` and `S`.
//! - The `ape` command (`src/bin/ape/`): `demo`, `run`, `eval`, `calibrate`, `info`.
//!
//! Errors are ape-attn's [`ape_attn::Error`], one type across the kernels and the model.

#![deny(missing_docs)]

pub mod cache;
pub mod config;
pub mod cpu;
mod cuda_ops;
mod device_ops;
#[cfg(feature = "emulator")]
pub mod emulated_ops;
pub mod engine;
pub mod eval;
pub mod gguf;
pub mod gpu;
pub mod hf;
pub mod model;
pub mod open;
pub mod quant;
pub mod serve;
pub mod store;
pub mod tokenizer;
pub mod weights;
