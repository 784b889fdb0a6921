//! A minimal Llama: model files (GGUF), configuration, tokenizer and forward pass.

pub mod config;
pub mod cpu;
mod cuda_ops;
pub mod engine;
pub mod gguf;
pub mod gpu;
pub mod hf;
pub mod model;
pub mod open;
pub mod quant;
pub mod tokenizer;
pub mod weights;
