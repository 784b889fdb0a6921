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
        Command::Demo => {
            eprintln!(
                "ape demo: the end-to-end demo (Llama forward pass in sequential, parallel, APE and \
                 Block-Attention modes) is not built yet; it is tracked as issue #4"
            );
            ExitCode::from(2)
        }
    }
}
