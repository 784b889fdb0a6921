//! The `ape` command.

use std::process::ExitCode;

use ape_attn::cuda::{kernel_build_info, Device};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ape",
    version,
    about = "ape-attn: attention over many cached KV blocks (APE, Block-Attention)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// How the CUDA kernels in this build were compiled, and which GPU (if any) is usable.
    Info,
    /// End-to-end demo on a real model in the four encoding modes (not built yet: issue #4).
    Demo,
    /// Print a GGUF model file's metadata and tensor directory.
    Inspect {
        /// The GGUF file.
        #[arg(long)]
        model: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Info => {
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
            ExitCode::SUCCESS
        }
        Command::Inspect { model } => match inspect(&model) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ape inspect: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Demo => {
            eprintln!(
                "ape demo: the end-to-end demo (Llama forward pass in sequential, parallel, APE and \
                 Block-Attention modes) is not built yet; it is tracked as issue #4"
            );
            ExitCode::from(2)
        }
    }
}

fn inspect(path: &std::path::Path) -> ape_attn::Result<()> {
    use ape_attn::llama::gguf::{Gguf, Value};
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
