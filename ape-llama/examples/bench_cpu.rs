//! Our side of `scripts/bench-cpu.sh`: one measurement of the CPU forward pass per process, timed
//! after the model is loaded, printed as one JSON line on stdout. The driver
//! (`scripts/bench_cpu.py`) runs llama.cpp on the same GGUF file, thread count and token ids, and
//! reads each process's peak RSS from its own wait.
//!
//! Everything goes through the public model and engine API ([`LlamaModel`], [`Engine`]), so the
//! figures are those of whatever forward pass the crate has.
//!
//! ```text
//! bench_cpu prefill --tokens N            one forward over ids[..N], last row's logits
//! bench_cpu decode --context C --steps S  ids[..C] prefilled untimed, then S one-token steps
//!                                         feeding ids[C..C+S], timed
//! bench_cpu warm --store DIR ...          encodes the passages into the disk block store (APE)
//! bench_cpu ttft --store DIR ...          the passages from the store, the question prefilled
//!                                         over them (APE), the first token chosen; timed
//! ```
//!
//! Common options: `--model M` (GGUF file or checkpoint folder), `--threads T` (rayon's global
//! pool and the GEMM's threads), `--ids FILE` (JSON `{"ids": [...]}`: the token ids both sides
//! read). Passage `i` of the time-to-first-token case is `ids[i*L..(i+1)*L]`, the question the
//! `Q` ids after the last passage.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use ape_attn::{ApeParams, Error, Result, SegmentRole};
use ape_llama::cpu::CpuModel;
use ape_llama::engine::{Engine, Mode, Prompt, Sampler, Sampling};
use ape_llama::model::{LlamaModel, LogitRows, Past, Step};
use ape_llama::store::{BlockStore, Source, StoreOptions};
use clap::{Args, Parser, Subcommand};
use serde_json::json;

#[derive(Parser)]
#[command(about = "One CPU benchmark measurement per process (scripts/bench-cpu.sh)")]
struct Cli {
    #[command(subcommand)]
    what: What,
}

#[derive(Args)]
struct Common {
    /// The model: a GGUF file or a Hugging Face checkpoint folder.
    #[arg(long)]
    model: PathBuf,
    /// Threads: rayon's global pool and the GEMM's.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// JSON file `{"ids": [...]}`: the token ids every measurement reads from.
    #[arg(long)]
    ids: PathBuf,
}

#[derive(Args)]
struct Passages {
    /// The block store's folder (disk tier).
    #[arg(long)]
    store: PathBuf,
    /// Number of passages.
    #[arg(long, default_value_t = 16)]
    passages: usize,
    /// Tokens per passage.
    #[arg(long, default_value_t = 256)]
    passage_len: usize,
    /// Tokens of the question.
    #[arg(long, default_value_t = 64)]
    question: usize,
}

#[derive(Subcommand)]
enum What {
    /// Prefill throughput: one forward over the first N ids.
    Prefill {
        #[command(flatten)]
        common: Common,
        /// Prompt tokens.
        #[arg(long)]
        tokens: usize,
    },
    /// Decode throughput: C tokens of context prefilled (untimed), then S single-token steps.
    Decode {
        #[command(flatten)]
        common: Common,
        /// Tokens of context before the timed steps.
        #[arg(long)]
        context: usize,
        /// Timed single-token steps.
        #[arg(long, default_value_t = 64)]
        steps: usize,
    },
    /// Batched decode: B sequences, each with C tokens of context of its own (untimed), then S
    /// steps, each one forward pass over the B sequences' next tokens
    /// ([`LlamaModel::forward_batch`]). Reports the tokens of all sequences per second.
    DecodeBatch {
        #[command(flatten)]
        common: Common,
        /// Sequences decoded together.
        #[arg(long)]
        batch: usize,
        /// Tokens of context of each sequence.
        #[arg(long, default_value_t = 256)]
        context: usize,
        /// Timed steps.
        #[arg(long, default_value_t = 32)]
        steps: usize,
    },
    /// Encodes the passages into the block store (the warm-up before `ttft`).
    Warm {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        passages: Passages,
    },
    /// Time to first token of the question over the passages read from the block store.
    Ttft {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        passages: Passages,
    },
}

/// The model, loaded with `threads` threads, and the ids.
struct Setup {
    engine: Engine<CpuModel>,
    ids: Vec<u32>,
    load_s: f64,
    threads: usize,
}

fn setup(c: &Common, store: Option<&Path>) -> Result<Setup> {
    let start = Instant::now();
    // The GEMM (matrixmultiply) reads its thread count from the environment on first use.
    if std::env::var_os("MATMUL_NUM_THREADS").is_none() {
        std::env::set_var("MATMUL_NUM_THREADS", c.threads.to_string());
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(c.threads)
        .build_global()
        .map_err(|e| Error::InvalidInput(format!("rayon's pool: {e}")))?;
    if !c.model.exists() {
        return Err(Error::Model(format!(
            "{} does not exist (scripts/fetch-model.sh fetches the default model)",
            c.model.display()
        )));
    }
    let text = std::fs::read_to_string(&c.ids).map_err(Error::io_at(&c.ids))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::InvalidInput(format!("{}: {e}", c.ids.display())))?;
    let ids = v["ids"]
        .as_array()
        .ok_or_else(|| Error::InvalidInput(format!("{}: no \"ids\" array", c.ids.display())))?
        .iter()
        .map(|x| {
            x.as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| Error::InvalidInput(format!("{}: bad id {x}", c.ids.display())))
        })
        .collect::<Result<Vec<u32>>>()?;
    let files = ape_llama::open::open(&c.model)?;
    let model = CpuModel::from_source(files.config.clone(), files.weights.as_ref(), |_, _| {})?;
    // The model holds what it needs; the file's mapping goes, as it does in `ape`.
    let ape_llama::open::ModelFiles { id, weights, .. } = files;
    drop(weights);
    let mut engine = Engine::new(model, id, 8 << 30);
    if let Some(dir) = store {
        let s = BlockStore::open(&StoreOptions {
            dir: Some(dir.to_path_buf()),
            disk_budget: 64 << 30,
            redis: None,
        })
        .map_err(|e| Error::InvalidInput(format!("block store at {}: {e}", dir.display())))?;
        engine.set_store(Some(Arc::new(s)));
    }
    Ok(Setup {
        engine,
        ids,
        load_s: start.elapsed().as_secs_f64(),
        threads: c.threads,
    })
}

/// `ids[range]`, or an error naming how many ids the case needs.
fn take(ids: &[u32], from: usize, n: usize) -> Result<&[u32]> {
    ids.get(from..from + n).ok_or_else(|| {
        Error::InvalidInput(format!(
            "the ids file holds {} ids, this case needs {}",
            ids.len(),
            from + n
        ))
    })
}

fn prompt(ids: &[u32], p: &Passages) -> Result<Prompt> {
    let contexts = (0..p.passages)
        .map(|i| Ok(take(ids, i * p.passage_len, p.passage_len)?.to_vec()))
        .collect::<Result<_>>()?;
    Ok(Prompt {
        prefix: vec![],
        contexts,
        question: take(ids, p.passages * p.passage_len, p.question)?.to_vec(),
    })
}

fn run(cli: Cli) -> Result<serde_json::Value> {
    Ok(match cli.what {
        What::Prefill { common, tokens } => {
            let s = setup(&common, None)?;
            let ids = take(&s.ids, 0, tokens)?;
            let model = &s.engine.model;
            let t = Instant::now();
            let out = model.forward(ids, 0, &[], &ApeParams::plain(), LogitRows::Last)?;
            let first = Sampler::new(Sampling::Greedy)?.sample(&out.logits)?;
            let dt = t.elapsed().as_secs_f64();
            json!({"side": "ours", "case": "prefill", "tokens": tokens, "seconds": dt,
                   "tokens_per_s": tokens as f64 / dt, "load_s": s.load_s,
                   "threads": s.threads, "next": first})
        }
        What::Decode {
            common,
            context,
            steps,
        } => {
            let s = setup(&common, None)?;
            let ctx = take(&s.ids, 0, context)?;
            let feed = take(&s.ids, context, steps)?;
            let model = &s.engine.model;
            let plain = ApeParams::plain();
            // The context's K/V, as the engine's sequential prefill leaves it (untimed).
            let mut kv = match context {
                0 => None,
                _ => Some(model.forward(ctx, 0, &[], &plain, LogitRows::Last)?.kv),
            };
            let t = Instant::now();
            let mut sampler = Sampler::new(Sampling::Greedy)?;
            let mut last = 0;
            for (i, &tok) in feed.iter().enumerate() {
                // Each step attends to everything before it, as the engine's decode step does.
                let past: Vec<Past<'_, _>> = kv
                    .iter()
                    .map(|b| Past {
                        kv: b,
                        pos_offset: 0,
                        role: SegmentRole::Causal,
                    })
                    .collect();
                let out = model.forward(&[tok], context + i, &past, &plain, LogitRows::Last)?;
                drop(past);
                last = sampler.sample(&out.logits)?;
                match kv.as_mut() {
                    Some(b) => model.append_block(b, out.kv)?,
                    None => kv = Some(out.kv),
                }
            }
            let dt = t.elapsed().as_secs_f64();
            json!({"side": "ours", "case": "decode", "context": context, "steps": steps,
                   "seconds": dt, "tokens_per_s": steps as f64 / dt, "load_s": s.load_s,
                   "threads": s.threads, "next": last})
        }
        What::DecodeBatch {
            common,
            batch,
            context,
            steps,
        } => {
            let s = setup(&common, None)?;
            let model = &s.engine.model;
            let plain = ApeParams::plain();
            let mut kvs = Vec::with_capacity(batch);
            for b in 0..batch {
                let ctx = take(&s.ids, b * context, context.max(1))?;
                kvs.push(model.forward(ctx, 0, &[], &plain, LogitRows::Last)?.kv);
            }
            let feed = take(&s.ids, batch * context.max(1), steps)?;
            let t = Instant::now();
            for (i, &tok) in feed.iter().enumerate() {
                let pasts: Vec<[Past<'_, _>; 1]> = kvs
                    .iter()
                    .map(|kv| {
                        [Past {
                            kv,
                            pos_offset: 0,
                            role: SegmentRole::Causal,
                        }]
                    })
                    .collect();
                let tokens = vec![tok; batch];
                let pos = context.max(1) + i;
                let steps: Vec<Step<'_, _>> = pasts
                    .iter()
                    .zip(&tokens)
                    .map(|(past, t)| Step {
                        tokens: std::slice::from_ref(t),
                        pos,
                        past,
                        ape: plain,
                        logits: LogitRows::Last,
                    })
                    .collect();
                let outs = model.forward_batch(&steps)?;
                drop(steps);
                drop(pasts);
                for (kv, out) in kvs.iter_mut().zip(outs) {
                    model.append_block(kv, out.kv)?;
                }
            }
            let dt = t.elapsed().as_secs_f64();
            json!({"side": "ours", "case": "decode-batch", "batch": batch, "context": context,
                   "steps": steps, "seconds": dt,
                   "tokens_per_s": (batch * steps) as f64 / dt, "load_s": s.load_s,
                   "threads": s.threads})
        }
        What::Warm { common, passages } => {
            std::fs::create_dir_all(&passages.store).map_err(Error::io_at(&passages.store))?;
            let mut s = setup(&common, Some(&passages.store))?;
            let p = prompt(&s.ids, &passages)?;
            let t = Instant::now();
            let state = s.engine.prefill(Mode::Ape(ApeParams::default()), &p)?;
            let encoded = state.tokens_encoded;
            drop(state);
            if let Some(store) = s.engine.store() {
                store.flush();
            }
            json!({"side": "ours", "case": "warm", "seconds": t.elapsed().as_secs_f64(),
                   "tokens_encoded": encoded, "load_s": s.load_s, "threads": s.threads})
        }
        What::Ttft { common, passages } => {
            let mut s = setup(&common, Some(&passages.store))?;
            let p = prompt(&s.ids, &passages)?;
            let t = Instant::now();
            let state = s.engine.prefill(Mode::Ape(ApeParams::default()), &p)?;
            let first = Sampler::new(Sampling::Greedy)?.sample(&state.logits)?;
            let dt = t.elapsed().as_secs_f64();
            let from_disk = state
                .sources
                .iter()
                .filter(|b| b.source == Source::Disk)
                .count();
            if from_disk != passages.passages {
                return Err(Error::InvalidInput(format!(
                    "{from_disk} of {} passages came from the store (run `warm` first with the same ids)",
                    passages.passages
                )));
            }
            json!({"side": "ours", "case": "ttft", "passages": passages.passages,
                   "passage_len": passages.passage_len, "question": passages.question,
                   "seconds": dt, "ttft_ms": dt * 1e3, "tokens_encoded": state.tokens_encoded,
                   "blocks_from_disk": from_disk, "load_s": s.load_s, "threads": s.threads,
                   "next": first})
        }
    })
}

fn main() {
    match run(Cli::parse()) {
        Ok(v) => println!("{v}"),
        Err(e) => {
            eprintln!("bench_cpu: {e}");
            std::process::exit(1);
        }
    }
}
