//! End-to-end time to first token at Llama-3-8B shapes (32 layers, hidden 4096, 32 heads, 8 KV
//! heads, head dim 128; synthetic bf16 weights generated on the GPU): a 64-token question over
//! 16 cached contexts totalling 4K-128K tokens, sequential (everything prefilled) against APE and
//! Block-Attention (contexts cached, only the question runs), plus prefill and 256 generated
//! tokens. Prints one JSON object per measurement (to stdout), for scripts/gpu/summarize.py.
//!
//! A plain harness, not criterion: a sequential prefill at 128K takes seconds, so each point is
//! the median of a few runs. `APE_E2E_MAX` caps the context (default 131072).
//!
//! Without a GPU the same measurements run on the CPU forward pass and the default model
//! (SmolLM2-135M, `scripts/fetch-model.sh`; `APE_MODEL` names another GGUF) at small sizes: 256 and
//! 512 context tokens, and prefill + 16 generated tokens at 512. Those lines say `"device":"cpu"`:
//! they show the shape of the result here, not a figure to report (BENCHMARKS.md).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ape_attn::cuda::Device;
use ape_attn::{ApeParams, RopeConfig, RopeLayout};
use ape_llama::cache::BlockCache;
use ape_llama::config::LlamaConfig;
use ape_llama::cpu::CpuModel;
use ape_llama::engine::{Engine, Mode, Prompt, Sampling};
use ape_llama::gguf::Gguf;
use ape_llama::gpu::GpuModel;
use ape_llama::model::LlamaModel;

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

/// `n` token ids below `vocab`, reproducible from `seed`.
fn tokens(n: usize, seed: u32, vocab: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| {
            i.wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(40_503))
                % vocab
        })
        .collect()
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

/// What one run measures: the total context lengths, the generation point, and repetitions.
struct Sweep {
    device: String,
    totals: Vec<usize>,
    /// Context length and tokens generated for the prefill + generation measurement.
    generate_at: (usize, usize),
    /// Repetitions per point (1 for slow sequential prefills above `slow_from` tokens).
    reps: usize,
    slow_from: usize,
    /// The block cache's budget.
    cache_bytes: usize,
    /// The device's free and total memory, logged to stderr after each total, so that an
    /// out-of-memory failure can be read from the log (free memory excludes what the stream's
    /// memory pool keeps of freed buffers).
    memory: Option<Box<dyn Fn() -> String>>,
}

/// TTFT of sequential, APE and Block-Attention over `CONTEXTS` contexts and a `QUESTION`-token
/// question for every total context length, then prefill + generation; one JSON line each.
fn run<M: LlamaModel>(engine: &mut Engine<M>, sweep: &Sweep) {
    let vocab = (engine.model.config().vocab_size as u32).min(128_000);
    let name = &sweep.device;
    let modes = [
        Mode::Sequential,
        Mode::Ape(ApeParams::default()),
        Mode::BlockAttention,
    ];
    for &total in &sweep.totals {
        // Each total starts from an empty cache: the blocks of the totals before it would
        // otherwise fill the budget and crowd the sequential prefill's activations (at 128K and 8B
        // shapes: 16 GiB of K/V being built and 15.5 GiB of activations beside 14 GiB of weights).
        engine.cache = BlockCache::new(sweep.cache_bytes);
        let per = total / CONTEXTS;
        let prompt = Prompt {
            prefix: tokens(32, 1, vocab),
            contexts: (0..CONTEXTS)
                .map(|i| tokens(per, 100 + i as u32, vocab))
                .collect(),
            question: tokens(QUESTION, 7, vocab),
        };
        for mode in modes {
            // Warm up (and fill the cache for the cached modes).
            engine.prefill(mode, &prompt).expect("prefill");
            let reps = if total >= sweep.slow_from && mode == Mode::Sequential {
                1
            } else {
                sweep.reps
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
        if let Some(memory) = &sweep.memory {
            eprintln!("after context {total}: {}", memory());
        }
        let (at, n) = sweep.generate_at;
        if total == at {
            for mode in modes {
                let t = Instant::now();
                let g = engine
                    .generate(mode, &prompt, Sampling::Greedy, n, &[])
                    .expect("generate");
                println!(
                    "{{\"bench\":\"end_to_end_{n}\",\"device\":{name:?},\"mode\":\"{}\",\"context\":{total},\"total_ms\":{:.3},\"ttft_ms\":{:.3},\"generated\":{}}}",
                    mode.name(),
                    t.elapsed().as_secs_f64() * 1e3,
                    g.ttft.as_secs_f64() * 1e3,
                    g.tokens.len()
                );
            }
        }
    }
}

/// The default model for the CPU run: `APE_MODEL`, else the one scripts/fetch-model.sh fetches.
fn cpu_model_path() -> PathBuf {
    std::env::var_os("APE_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // The workspace root, above this crate.
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        })
}

fn main() {
    let max: usize = std::env::var("APE_E2E_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(131_072);
    let dev = match Device::new(0) {
        Ok(d) => Arc::new(d),
        Err(e) => {
            println!("no GPU ({e}): the CPU forward pass at small sizes");
            let path = cpu_model_path();
            let model = match Gguf::open(&path).and_then(|g| CpuModel::load(&g)) {
                Ok(m) => m,
                Err(e) => {
                    println!(
                        "end-to-end benchmarks skipped: {}: {e} (run scripts/fetch-model.sh)",
                        path.display()
                    );
                    return;
                }
            };
            let cache_bytes = 1 << 30;
            let mut engine = Engine::new(model, "cpu-e2e", cache_bytes);
            let sweep = Sweep {
                device: "cpu".into(),
                totals: [256, 512].into_iter().filter(|&t| t <= max).collect(),
                generate_at: (512, 16),
                reps: 3,
                slow_from: 512,
                cache_bytes,
                memory: None,
            };
            run(&mut engine, &sweep);
            return;
        }
    };
    let device = dev.name().unwrap_or_default();
    let memory = {
        let dev = dev.clone();
        move || match dev.memory_info() {
            Ok((free, total)) => format!(
                "{:.1} GiB free of {:.1} GiB",
                free as f64 / (1u64 << 30) as f64,
                total as f64 / (1u64 << 30) as f64
            ),
            Err(e) => format!("memory info: {e}"),
        }
    };
    let model = GpuModel::synthetic(dev, llama3_8b(), 1).expect("synthetic 8B weights");
    // 24 GiB of cache: one mode's 128K blocks (16 GiB) plus room. The cache is emptied before
    // each total, so a sequential 128K prefill (16 GiB of K/V, 15.5 GiB of activations at its
    // peak) runs beside the 14 GiB of weights alone: about 46 GiB of an 80 GiB H100. The cached
    // modes then use at most 14 + 24 GiB and the question's activations.
    let cache_bytes = 24 << 30;
    let mut engine = Engine::new(model, "synthetic-llama3-8b", cache_bytes);
    let sweep = Sweep {
        device,
        totals: [4096usize, 8192, 16_384, 32_768, 65_536, 131_072]
            .into_iter()
            .filter(|&t| t <= max)
            .collect(),
        generate_at: (32_768, 256),
        reps: 3,
        slow_from: 65_536,
        cache_bytes,
        memory: Some(Box::new(memory)),
    };
    run(&mut engine, &sweep);
}
