//! The `ape` command: the end-to-end demo, runs over your own passages, and model/kernel info.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use ape_attn::cuda::{kernel_build_info, Device};
use ape_attn::{ApeParams, ApeVariant, Error};
use ape_llama::cpu::CpuModel;
use ape_llama::engine::{Engine, Generation, Mode, Prompt, Sampling};
use ape_llama::eval::{self, dataset, metrics, Objective};
use ape_llama::gguf::{Gguf, Value};
use ape_llama::gpu::GpuModel;
use ape_llama::model::LlamaModel;
use ape_llama::tokenizer::Tokenizer;
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use std::sync::Arc;

#[macro_use]
mod load;
mod answer;
mod cache;
mod evaluate;
mod serve;

use answer::*;
use cache::*;
use evaluate::*;
use load::*;

const MODES_HELP: &str = "\
Encoding modes (how the passages are encoded before the question attends to them):
  sequential       [system, passage 1..N, question] prefilled as one sequence on every request:
                   the baseline, nothing cached.
  parallel         each passage encoded once after the shared prefix, all at the same positions
                   (position reuse), cached; the question attends to all of them with plain
                   softmax (APE with T = S = 1).
  ape              as parallel, with APE's attention temperature T and scaling factor S applied to
                   the passages in every layer, at the question and at every generated token
                   (defaults T = 0.9, S = 0.9).
  block-attention  each passage encoded alone from position 0, cached; at use its keys are
                   re-rotated to the passage's real offset, and the question attends to all of them
                   with plain softmax (meant for block-fine-tuned models).";

#[derive(Parser)]
#[command(
    name = "ape",
    version,
    about = "ape-attn: attention over many cached KV blocks (APE, Block-Attention)",
    after_help = MODES_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// An OpenAI-compatible HTTP server (POST /v1/chat/completions with a `documents` list):
    /// passages sent with a question are encoded once, kept in the block store, and reused by
    /// later requests in any order and subset; concurrent requests decode as one batch.
    #[command(after_help = MODES_HELP)]
    Serve(Box<serve::ServeArgs>),
    /// Answer a built-in multi-passage question in all four modes on the default model, with
    /// time to first token, tokens per second, and cache hits on a second identical request.
    #[command(after_help = MODES_HELP)]
    Demo {
        /// GGUF file or Hugging Face directory (default: SmolLM2-135M-Instruct, fetched by
        /// scripts/fetch-model.sh).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Tokens to generate per answer.
        #[arg(long, default_value_t = 40)]
        max_tokens: usize,
        /// Where to run (auto: GPU 0 when one is usable, else the CPU; cuda: the GPU forward
        /// pass, not yet validated on a GPU; emulator: the same pass on the kernel emulator, in
        /// builds with the `emulator` feature).
        #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
        device: DeviceArg,
    },
    /// Answer a question over your passages (one file each). Passages are encoded once and kept
    /// in the block store: a later run over the same passages (in any order or subset) reads
    /// them instead of encoding them.
    #[command(after_help = MODES_HELP)]
    Run {
        /// GGUF file or Hugging Face directory (default: SmolLM2-135M-Instruct, fetched by
        /// scripts/fetch-model.sh).
        #[arg(long)]
        model: Option<PathBuf>,
        /// A passage file; repeat for several.
        #[arg(long = "context", required = true)]
        contexts: Vec<PathBuf>,
        /// The question.
        #[arg(long, allow_hyphen_values = true)]
        question: String,
        /// Encoding mode.
        #[arg(long, value_enum, default_value_t = ModeArg::Ape)]
        mode: ModeArg,
        /// APE attention temperature T (finite, > 0).
        #[arg(long, allow_hyphen_values = true, default_value_t = ApeParams::DEFAULT_TEMPERATURE)]
        temperature: f32,
        /// APE scaling factor S (finite, > 0).
        #[arg(long, allow_hyphen_values = true, default_value_t = ApeParams::DEFAULT_SCALE)]
        scale: f32,
        /// Use the older form of S that multiplies the context mass (a = T*L_C + ln S).
        #[arg(long)]
        scaled_mass: bool,
        /// Tokens to generate.
        #[arg(long, allow_hyphen_values = true, default_value_t = 64)]
        max_tokens: usize,
        /// Sample with this temperature instead of greedy decoding.
        #[arg(long, allow_hyphen_values = true)]
        sampling_temperature: Option<f32>,
        /// Seed for sampling.
        #[arg(long, allow_hyphen_values = true, default_value_t = 0)]
        seed: u64,
        /// Print the top K logits at the first answer position (for validation).
        #[arg(long, default_value_t = 0)]
        print_logits: usize,
        /// Where to run (auto: GPU 0 when one is usable, else the CPU).
        #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
        device: DeviceArg,
        /// System prompt.
        #[arg(long, default_value = DEFAULT_SYSTEM)]
        system: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// The block store: what it holds, emptying it, filling it ahead of the questions.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Measure how much of sequential encoding's accuracy each mode keeps, on a generated
    /// multi-document QA set about fictional entities (seeded).
    Eval {
        /// GGUF model (default: SmolLM2-135M-Instruct).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Document counts to evaluate, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,2,3,5,10")]
        docs: Vec<usize>,
        /// Examples per position of the relevant document.
        #[arg(long, default_value_t = 2)]
        per_position: usize,
        /// Candidate answers per question (gold included).
        #[arg(long, default_value_t = 4)]
        candidates: usize,
        /// Dataset seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// APE temperature T.
        #[arg(long, allow_hyphen_values = true, default_value_t = ApeParams::DEFAULT_TEMPERATURE)]
        temperature: f32,
        /// APE scaling factor S.
        #[arg(long, allow_hyphen_values = true, default_value_t = ApeParams::DEFAULT_SCALE)]
        scale: f32,
        /// Tokens of each greedy answer.
        #[arg(long, default_value_t = 24)]
        max_answer_tokens: usize,
        /// Write the results as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Keep the encoded passages in this folder (default: this process's memory only).
        #[arg(long, value_name = "DIR")]
        store: Option<PathBuf>,
    },
    /// Search APE's T and S on a calibration split, then report held-out results.
    Calibrate {
        /// GGUF model (default: SmolLM2-135M-Instruct).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Document counts of both splits, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "2,3,5")]
        docs: Vec<usize>,
        /// Examples per position of the relevant document, per split.
        #[arg(long, default_value_t = 1)]
        per_position: usize,
        /// Candidate answers per question.
        #[arg(long, default_value_t = 4)]
        candidates: usize,
        /// Temperatures to try, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "0.5,0.6,0.7,0.8,0.9,1.0")]
        temperatures: Vec<f32>,
        /// Scaling factors to try, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "0.5,0.7,0.9,1.0,1.2")]
        scales: Vec<f32>,
        /// What to optimise.
        #[arg(long, value_enum, default_value_t = ObjectiveArg::Kl)]
        objective: ObjectiveArg,
        /// Seed of the calibration split (the held-out split uses seed + 1000).
        #[arg(long, default_value_t = 2)]
        seed: u64,
        /// Write the results as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// How the CUDA kernels in this build were compiled, and which GPU (if any) is usable.
    Info,
    /// Print a GGUF model file's metadata and tensor directory.
    Inspect {
        /// The GGUF file.
        #[arg(long)]
        model: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Sequential,
    Parallel,
    Ape,
    BlockAttention,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ObjectiveArg {
    /// Lowest mean KL divergence from sequential.
    Kl,
    /// Highest candidate-likelihood accuracy.
    Accuracy,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DeviceArg {
    /// GPU 0 when one is usable (a driver, a device, kernels in this build, and the model loads
    /// there), else the CPU; the device line says which, and why not the GPU.
    Auto,
    /// The CPU forward pass (the file's quantised weights, 8-bit activations).
    Cpu,
    /// The GPU forward pass on GPU 0.
    Cuda,
    /// The GPU forward pass on the kernel emulator: the CUDA kernels run on the CPU (slow; for
    /// checking the GPU path without a GPU). Only in builds with `--features emulator`.
    #[cfg(feature = "emulator")]
    Emulator,
}

const DEFAULT_SYSTEM: &str = "You are a helpful assistant. Answer the question using the passages.";
const DEFAULT_MODEL: &str = ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Subcommand)]
enum CacheCommand {
    /// Per tier: blocks, bytes, hits, misses, evictions, corrupt blocks dropped.
    Stats {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Remove the stored blocks of a tier (all: disk, and Redis when given).
    Clear {
        /// Which tier.
        #[arg(long, value_enum, default_value_t = TierArg::All)]
        tier: TierArg,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Encode passages into the store ahead of the questions (the blocks a question in this
    /// mode, with this system prompt, reads).
    Warm {
        /// GGUF file or Hugging Face directory (default: SmolLM2-135M-Instruct).
        #[arg(long)]
        model: Option<PathBuf>,
        /// A passage file; repeat for several.
        #[arg(long = "context", required = true)]
        contexts: Vec<PathBuf>,
        /// The mode whose blocks to encode (ape and parallel share theirs).
        #[arg(long, value_enum, default_value_t = ModeArg::Ape)]
        mode: ModeArg,
        /// Where to encode (auto: GPU 0 when one is usable, else the CPU).
        #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
        device: DeviceArg,
        /// System prompt (part of the key of APE's blocks).
        #[arg(long, default_value = DEFAULT_SYSTEM)]
        system: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

impl ModeArg {
    fn mode(self, ape: ApeParams) -> Mode {
        match self {
            ModeArg::Sequential => Mode::Sequential,
            ModeArg::Parallel => Mode::Parallel,
            ModeArg::Ape => Mode::Ape(ape),
            ModeArg::BlockAttention => Mode::BlockAttention,
        }
    }
}

/// The command line, or the exit for `--help`, `--version` and bad arguments. A bad argument is
/// one line on stderr, like every other error of the command.
fn parse_args() -> Result<Cli, ExitCode> {
    use clap::error::ErrorKind;
    Cli::try_parse().map_err(|e| match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            ExitCode::from(e.exit_code().clamp(0, 255) as u8)
        }
        _ => {
            // clap's message up to its usage block, on one line: the first line, then what it
            // lists below it (the missing arguments, the possible values), without the tips.
            let text = e.to_string();
            let parts: Vec<&str> = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
                .collect();
            let line = if parts.is_empty() {
                "invalid arguments".to_string()
            } else {
                parts.join(" ")
            };
            eprintln!("ape: {line} (see --help)");
            ExitCode::from(2)
        }
    })
}

fn main() -> ExitCode {
    let cli = match parse_args() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let result = match cli.command {
        Command::Info => info(),
        Command::Eval {
            model,
            docs,
            per_position,
            candidates,
            seed,
            temperature,
            scale,
            max_answer_tokens,
            json,
            store,
        } => (|| {
            let ape = ApeParams::new(temperature, scale)?;
            let examples = dataset::generate(seed, &docs, per_position, candidates)?;
            let modes = [
                Mode::Sequential,
                Mode::Parallel,
                Mode::Ape(ape),
                Mode::BlockAttention,
            ];
            eval_command(model, &examples, &modes, max_answer_tokens, json, store)
        })(),
        Command::Cache { command } => match command {
            CacheCommand::Stats { store } => cache_stats(&store),
            CacheCommand::Clear { tier, store } => cache_clear(&store, tier),
            CacheCommand::Warm {
                model,
                contexts,
                mode,
                device,
                system,
                store,
            } => cache_warm(WarmArgs {
                model,
                contexts,
                mode: mode.mode(ApeParams::default()),
                device,
                system,
                store,
            }),
        },
        Command::Calibrate {
            model,
            docs,
            per_position,
            candidates,
            temperatures,
            scales,
            objective,
            seed,
            json,
        } => calibrate_command(CalibrateArgs {
            model,
            docs,
            per_position,
            candidates,
            temperatures,
            scales,
            objective: match objective {
                ObjectiveArg::Kl => Objective::Kl,
                ObjectiveArg::Accuracy => Objective::Accuracy,
            },
            seed,
            json,
        }),
        Command::Inspect { model } => inspect(&model),
        Command::Serve(args) => serve::serve(*args),
        Command::Demo {
            model,
            max_tokens,
            device,
        } => demo(model, max_tokens, device),
        Command::Run {
            model,
            contexts,
            question,
            mode,
            temperature,
            scale,
            scaled_mass,
            max_tokens,
            sampling_temperature,
            seed,
            print_logits,
            device,
            system,
            store,
        } => (|| {
            let mut ape = ApeParams::new(temperature, scale)?;
            if scaled_mass {
                ape = ape.with_variant(ApeVariant::ScaledMass);
            }
            let mode = mode.mode(ape);
            let sampling = match sampling_temperature {
                None => Sampling::Greedy,
                Some(temperature) => Sampling::Temperature { temperature, seed },
            };
            run(RunArgs {
                model,
                contexts,
                question,
                mode,
                max_tokens,
                sampling,
                print_logits,
                device,
                system,
                store,
            })
        })(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ape: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn info() -> ape_attn::Result<()> {
    println!("kernels: {}", kernel_build_info());
    match Device::new(0) {
        Ok(dev) => {
            let name = dev
                .name()
                .unwrap_or_else(|e| format!("(name unavailable: {e})"));
            println!("device 0: {name}");
        }
        Err(e) => println!("device 0: none ({e})"),
    }
    Ok(())
}

fn inspect(path: &Path) -> ape_attn::Result<()> {
    let g = Gguf::open(path)?;
    println!(
        "GGUF v{}: {} metadata keys, {} tensors",
        g.version,
        g.metadata.len(),
        g.tensors.len()
    );
    for (k, v) in &g.metadata {
        match v {
            Value::Array(a) => println!("  {k} = [{} values]", a.len()),
            Value::Str(s) if s.chars().count() > 80 => {
                println!("  {k} = {:?}...", s.chars().take(80).collect::<String>())
            }
            v => println!("  {k} = {v:?}"),
        }
    }
    for t in g.tensors.values() {
        println!("  {} {:?} {:?} ({} bytes)", t.name, t.ty, t.dims, t.len);
    }
    Ok(())
}
