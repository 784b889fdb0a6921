//! Fuzzes everything a model file goes through: the GGUF reader, the config, the tokenizer and the
//! CPU model loader. Any input must give Ok or an error, never a panic, a hang or an out-of-bounds
//! read. Run: `cargo +nightly fuzz run gguf` (seed it with a small GGUF, e.g. one from tests/gguf.rs).
#![no_main]

use ape_attn::llama::config::LlamaConfig;
use ape_attn::llama::cpu::CpuModel;
use ape_attn::llama::gguf::Gguf;
use ape_attn::llama::tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(g) = Gguf::parse(data.to_vec()) {
        let _ = Tokenizer::from_gguf(&g);
        if let Ok(c) = LlamaConfig::from_gguf(&g) {
            // Loading allocates what the (validated) tensor directory describes, which the input
            // had to contain: bounded by the input size.
            if c.dim.checked_mul(c.vocab_size).is_some_and(|n| n < 1 << 24) {
                let _ = CpuModel::load(&g);
            }
        }
    }
});
