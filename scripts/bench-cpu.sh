#!/usr/bin/env bash
# Our CPU forward pass against llama.cpp on this machine (BENCHMARKS.md, "CPU forward pass against
# llama.cpp"): prefill tokens/s at 512 and 2048 tokens, decode tokens/s after 0, 1K and 4K tokens
# of context, time to first token of a 64-token question over 16 cached passages of 256 tokens,
# and each process's peak RSS. The same GGUF file, thread count and token ids on both sides, one
# process per measurement, the sides alternating; medians and their ratios go to a Markdown table
# and a plot in bench-results/cpu/LABEL/ (scripts/bench_cpu.py says what each side does).
#
# Usage: scripts/bench-cpu.sh [--rounds N] [--threads T] [--quick] [--ours-only] [--model GGUF]
#                             [--prefill N,..] [--decode C,..]
#                             [--label NAME] [--out DIR] [--write-benchmarks] [--bin PROGRAM]
#   --rounds N          rounds per side (default 5; 1 with --quick)
#   --threads T         threads on both sides (default: nproc)
#   --quick             tiny sizes, one round (results in target/bench-cpu-runs/LABEL)
#   --prefill N,..      prefill sizes (default 512,2048)
#   --decode C,..       decode contexts (default 0,1024,4096)
#   --ours-only         our side only: no llama.cpp, nothing installed (the test command's stage)
#   --model GGUF        the model (default: the project's, fetched by scripts/fetch-model.sh)
#   --label NAME        names the results folder and the BENCHMARKS.md section (default latest)
#   --write-benchmarks  replaces BENCHMARKS.md's section for LABEL with this run's table
#   --bin PROGRAM       our measurement program, already built (default: built here, release)
# Without --ours-only, llama-cpp-python is installed into .tools/llamacpp when missing
# (scripts/install-llamacpp.sh). Our program is built CPU-only (no CUDA kernels, which the CPU
# pass does not use) in target/bench-cpu, so that no nvcc run is waited for and the main build's
# artefacts stay as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
command_line="bash scripts/bench-cpu.sh $*"
args=("$@")
ours_only=0
model=""
bin=""
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --ours-only) ours_only=1 ;;
    --model) model=${args[i + 1]:-} ;;
    --bin) bin=${args[i + 1]:-} ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
  esac
done

if [ -z "$model" ]; then
  model=$(bash scripts/fetch-model.sh | tail -n 1)
  args+=(--model "$model")
elif [ ! -f "$model" ]; then
  echo "bench-cpu: model $model not found (a GGUF file; scripts/fetch-model.sh fetches the default one)" >&2
  exit 2
fi

if [ -z "$bin" ]; then
  echo "== building our measurement program (release, CPU-only, target/bench-cpu)" >&2
  APE_ATTN_CPU_ONLY=1 CARGO_TARGET_DIR=target/bench-cpu \
    cargo build --release --quiet -p ape-llama --example bench_cpu
  args+=(--bin target/bench-cpu/release/examples/bench_cpu)
elif [ ! -x "$bin" ]; then
  echo "bench-cpu: $bin is not an executable (build it with: cargo build --release -p ape-llama --example bench_cpu)" >&2
  exit 2
fi

if [ "$ours_only" -eq 1 ]; then
  python=python3
else
  python=$(bash scripts/install-llamacpp.sh | tail -n 1)
  args+=(--peer-python "$python")
fi
exec "$python" scripts/bench_cpu.py run --command "$command_line" "${args[@]}"
