#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser: scripts/fuzz.sh [SECONDS] [TARGET...]
#
# The targets (fuzz/fuzz_targets/): gguf (GGUF reader, dequantisation, CPU model load),
# gguf_tokenizer (the tokenizer a GGUF describes), safetensors (header and tensors), hf_config
# (config.json), block_file (a stored KV block read against the block asked for: only the exact
# block of that key loads, and any flipped byte of a valid block is refused), chat_request (the
# request bodies of `ape serve`).
#
# Runs each target of fuzz/ (default: all) for SECONDS (default 120) under libFuzzer with
# AddressSanitizer, on stable Rust (cargo-fuzz needs nightly flags: RUSTC_BOOTSTRAP=1 allows them).
# Installs cargo-fuzz when it is missing. Seeds come from the real model's header and the test
# fixtures (scripts/fuzz-seeds.py), plus every file in ape-llama/tests/fixtures/fuzz/<target>/
# (saved findings, and block_file's valid blocks);
# the growing corpus stays in fuzz/corpus/<target>/ (git-ignored) between runs.
#
# Each input runs under an allocation bound proportional to its size (fuzz/src/bound.rs), a
# 10-second timeout and a 2 GB RSS limit. A crash, a hang or an allocation past the bound fails
# the run; the input is left in fuzz/artifacts/<target>/. To keep it as a regression test, copy it
# to ape-llama/tests/fixtures/fuzz/<target>/ (ape-llama/tests/fuzz_regressions.rs replays every file there).
#
# Prints one line per target: executions, coverage (libFuzzer's cov and ft), corpus size.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-120}
shift || true
if ! [[ $seconds =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: scripts/fuzz.sh [SECONDS] [TARGET...] (SECONDS: a whole number > 0)" >&2
  exit 2
fi
# APE_FUZZ_SEED fixes libFuzzer's random seed (the test command's short pass uses 1).
seed_flag=()
if [ -n "${APE_FUZZ_SEED:-}" ]; then
  seed_flag=(-seed="$APE_FUZZ_SEED")
fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(gguf gguf_tokenizer safetensors hf_config block_file chat_request)
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install --locked --quiet cargo-fuzz@0.13.2
fi

export RUSTC_BOOTSTRAP=1
# The parsers need no kernels: build the crate CPU-only, whatever nvcc is around.
export APE_ATTN_CPU_ONLY=1

model=$(bash scripts/fetch-model.sh | tail -n 1)
python3 scripts/fuzz-seeds.py "$model" fuzz/seeds ape-llama/tests/fixtures/kquants.json >/dev/null

log_dir=fuzz/logs
mkdir -p "$log_dir"
echo "== building the fuzz targets"
if ! cargo fuzz build --release --debug-assertions >"$log_dir/build.log" 2>&1; then
  tail -n 40 "$log_dir/build.log" >&2
  echo "cargo fuzz build failed" >&2
  exit 1
fi
summary=()
status=0
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/seeds/$t" "ape-llama/tests/fixtures/fuzz/$t"
  log="$log_dir/$t.log"
  echo "== $t: ${seconds}s"
  if cargo fuzz run --release --debug-assertions "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" "ape-llama/tests/fixtures/fuzz/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 "${seed_flag[@]}" \
    >"$log" 2>&1; then
    result=ok
  else
    result="FAILED (see $log; the input is in fuzz/artifacts/$t/)"
    status=1
    grep -E "panicked at|ERROR: |==ape-attn-fuzz==|Test unit written" "$log" | head -n 5 >&2 || true
  fi
  execs=$(grep -oE "stat::number_of_executed_units: [0-9]+" "$log" | tail -n 1 | grep -oE "[0-9]+$" || echo "?")
  cov=$(grep -oE "cov: [0-9]+ ft: [0-9]+ corp: [0-9]+" "$log" | tail -n 1 || echo "cov: ?")
  summary+=("$t: $execs executions, $cov, $result")
done
echo "== fuzz summary (${seconds}s per target)"
printf '%s\n' "${summary[@]}"
exit $status
