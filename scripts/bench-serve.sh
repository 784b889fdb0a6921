#!/usr/bin/env bash
# `ape serve` against llama.cpp's OpenAI-compatible server (llama-cpp-python's llama_cpp.server)
# on a RAG workload (BENCHMARKS.md, "RAG serving"): 50 generated passages of about 200 tokens,
# each request 5 of them drawn at random in random order plus a short question, 4 warm-up
# requests, then 40 requests at concurrency 1 and 40 others at concurrency 4, greedy, at most 32
# tokens, streamed. The same GGUF file and thread count on both servers, one at a time, each a
# subprocess on a free loopback port, stopped at the end (SIGTERM, then SIGKILL). Reports time to
# first token and end-to-end latency (median, p95, client-side), output tokens/s and errors per
# server and concurrency, the ratios ours / llama.cpp, and how often each of ours' modes answers as
# sequential does, in a Markdown table and a plot in bench-results/serve/LABEL/
# (scripts/bench_serve.py says exactly what each side gets).
#
# Usage: scripts/bench-serve.sh [--quick] [--ours-only] [--threads T] [--model GGUF] [--bin APE]
#                               [--requests N] [--passages N] [--warmup N] [--concurrency C,..]
#                               [--max-tokens N] [--no-modes] [--label NAME] [--out DIR]
#                               [--write-benchmarks]
#   --quick             small sizes (10 passages of about 115 tokens, 6 requests per level, 8
#                       tokens; results in target/bench-serve-runs/LABEL); no time asserted
#   --ours-only         ape serve only: no llama.cpp, nothing installed (the test command's stage)
#   --threads T         threads on each server (default: nproc)
#   --model GGUF        the model (default: the project's, fetched by scripts/fetch-model.sh)
#   --bin APE           the ape program, already built (default: built here, release, CPU-only,
#                       in target/bench-cpu)
#   --requests N        requests per concurrency level (default 40)
#   --passages N        passages in the pool (default 50)
#   --warmup N          warm-up requests per server (default 4)
#   --concurrency C,..  concurrency levels (default 1,4)
#   --max-tokens N      max_tokens of every request (default 32)
#   --no-modes          skip ours' pass over the concurrency-1 requests in each mode
#   --peer-only         llama.cpp only (checking the peer side; no ape program needed)
#   --label NAME        names the results folder and the BENCHMARKS.md section (default latest)
#   --write-benchmarks  replaces BENCHMARKS.md's section for LABEL with this run's tables
# Exits 1 when any request failed (an HTTP error, an error in the stream, a timeout). Without
# --ours-only, llama-cpp-python[server] is installed into .tools/llamacpp when missing
# (scripts/install-llamacpp.sh --server: llama.cpp built from source, several minutes the first
# time).
set -euo pipefail
cd "$(dirname "$0")/.."
command_line="bash scripts/bench-serve.sh $*"
args=("$@")
ours_only=0
peer_only=0
model=""
bin=""
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --ours-only) ours_only=1 ;;
    --peer-only) peer_only=1 ;;
    --model) model=${args[i + 1]:-} ;;
    --bin) bin=${args[i + 1]:-} ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
  esac
done

if [ -z "$model" ]; then
  model=$(bash scripts/fetch-model.sh | tail -n 1)
  args+=(--model "$model")
elif [ ! -f "$model" ]; then
  echo "bench-serve: model $model not found (a GGUF file; scripts/fetch-model.sh fetches the default one)" >&2
  exit 2
fi

if [ "$peer_only" -eq 0 ]; then
  if [ -z "$bin" ]; then
    echo "== building ape (release, CPU-only, target/bench-cpu)" >&2
    APE_ATTN_CPU_ONLY=1 CARGO_TARGET_DIR=target/bench-cpu \
      cargo build --release --quiet -p ape-llama --bin ape
    args+=(--bin target/bench-cpu/release/ape)
  elif [ ! -f "$bin" ] || [ ! -x "$bin" ]; then
    echo "bench-serve: $bin is not an executable (build it with: cargo build --release -p ape-llama --bin ape)" >&2
    exit 2
  elif ! "$bin" serve --help >/dev/null 2>&1; then
    echo "bench-serve: $bin has no working 'serve' command ($bin serve --help failed)" >&2
    exit 2
  fi
fi

if [ "$ours_only" -eq 1 ]; then
  python=python3
else
  python=$(bash scripts/install-llamacpp.sh --server | tail -n 1)
  args+=(--peer-python "$python")
fi
exec "$python" scripts/bench_serve.py run --command "$command_line" "${args[@]}"
