//! End-to-end time to first token at Llama-3-8B shapes (32 layers, hidden 4096, 32 heads, 8 KV
//! heads, head dim 128; synthetic bf16 weights generated on the GPU): a 64-token question over
//! 16 cached contexts totalling 4K-128K tokens, sequential (everything prefilled) against APE and
//! Block-Attention (contexts cached, only the question runs), plus prefill and 256 generated
//! tokens. Prints one JSON object per measurement (to stdout), for scripts/gpu/summarize.py.
//!
//! A plain harness, not criterion: a sequential prefill at 128K takes seconds, so each point is
//! the median of a few runs. `APE_E2E_MAX` caps the context (default 131072). Without a GPU it
//! prints one line and exits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ape_attn::cuda::Device;
use ape_attn::llama::config::LlamaConfig;
use ape_attn::llama::engine::{Engine, Mode, Prompt, Sampling};
use ape_attn::llama::gpu::GpuModel;
use ape_attn::{ApeParams, RopeConfig, RopeLayout};

const QUESTION: usize = 64;
const CONTEXTS: usize = 16;

fn llama3_8b() -> LlamaConfig {
    LlamaConfig {
        dim: 4096,
        n_layers: 32,
        n_heads: 32,
        n_kv_heads: 8,
        head_dim: 128,
        hidden_dim: 14336,
        vocab_size: 128_256,
        rms_eps: 1e-5,
        rope: RopeConfig::new(128, 500_000.0, RopeLayout::Neox).expect("rope"),
        context_length: 140_000,
    }
}

fn tokens(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| {
            i.wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(40_503))
                % 128_000
        })
        .collect()
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn main() {
    let dev = match Device::new(0) {
        Ok(d) => Arc::new(d),
        Err(e) => {
            println!("end-to-end benchmarks skipped: {e}");
            return;
        }
    };
    let name = dev.name().unwrap_or_default();
    let max: usize = std::env::var("APE_E2E_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(131_072);
    let model = GpuModel::synthetic(dev, llama3_8b(), 1).expect("synthetic 8B weights");
    // 24 GiB of cache: one mode's 128K blocks (17 GiB) plus room; with 16 GiB of weights this
    // leaves about 29 GiB for a sequential 128K prefill on an 80 GiB H100.
    let mut engine = Engine::new(model, "synthetic-llama3-8b", 24 << 30);
    let modes = [
        Mode::Sequential,
        Mode::Ape(ApeParams::default()),
        Mode::BlockAttention,
    ];
    for total in [4096usize, 8192, 16_384, 32_768, 65_536, 131_072] {
        if total > max {
            break;
        }
        let per = total / CONTEXTS;
        let prompt = Prompt {
            prefix: tokens(32, 1),
            contexts: (0..CONTEXTS).map(|i| tokens(per, 100 + i as u32)).collect(),
            question: tokens(QUESTION, 7),
        };
        for mode in modes {
            // Warm up (and fill the cache for the cached modes).
            engine.prefill(mode, &prompt).expect("prefill");
            let reps = if total >= 65_536 && mode == Mode::Sequential {
                1
            } else {
                3
            };
            let times: Vec<Duration> = (0..reps)
                .map(|_| {
                    let t = Instant::now();
                    engine.prefill(mode, &prompt).expect("prefill");
                    t.elapsed()
                })
                .collect();
            println!(
                "{{\"bench\":\"ttft\",\"device\":{name:?},\"mode\":\"{}\",\"context\":{total},\"question\":{QUESTION},\"ttft_ms\":{:.3}}}",
                mode.name(),
                median(times).as_secs_f64() * 1e3
            );
        }
        // Prefill + 256 generated tokens, at 32K.
        if total == 32_768 {
            for mode in modes {
                let t = Instant::now();
                let g = engine
                    .generate(mode, &prompt, Sampling::Greedy, 256, &[])
                    .expect("generate");
                println!(
                    "{{\"bench\":\"end_to_end_256\",\"device\":{name:?},\"mode\":\"{}\",\"context\":{total},\"total_ms\":{:.3},\"ttft_ms\":{:.3},\"generated\":{}}}",
                    mode.name(),
                    t.elapsed().as_secs_f64() * 1e3,
                    g.ttft.as_secs_f64() * 1e3,
                    g.tokens.len()
                );
            }
        }
    }
}
