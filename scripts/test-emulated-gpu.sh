#!/usr/bin/env bash
# The GPU code path end to end on the emulated CUDA device (docs/EMULATED-DEVICE.md): the same
# binaries a GPU runs, with target/emulated-device/ first on the library path, so cudarc loads
# the stand-ins for libcuda and libcublas instead of the real ones. In order:
#   1. every test in tests/gpu_*.rs, ape-llama/tests/gpu_*.rs and tests/cuda_device.rs, the
#      ignored ones included
#      (APE_GPU_QUICK=1: the attention tests' reduced sweep; tests/emulated_*.rs run the full
#      one on the kernel emulator), the real model with it (APE_MODEL);
#   2. examples/kv_pool_decode.rs;
#   3. `ape demo --device cuda`, which must print the four answers `ape demo --device cpu` prints,
#      and `ape serve --device cuda` (scripts/serve_batch_check.py): requests sent together answer
#      as they do one at a time;
#   4. a dry run of the GPU session (`session.sh quick`) on a bundle built here, with stand-ins
#      for what only the GPU machine has (scripts/gpu/dry-run/: PyTorch's peer, compute-sanitizer).
# Ends with one line, "N passed, 0 failed", and exits non-zero when anything failed.
# Called by scripts/test.sh (the README's test command); `APE_EMU_GPU_SKIP_SESSION=1` leaves out
# the dry run.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD

if [ -z "${NVCC:-}" ]; then
  if command -v nvcc > /dev/null 2>&1; then NVCC=$(command -v nvcc); else
    NVCC=$(bash scripts/install-nvcc.sh | tail -n 1)
  fi
  export NVCC
fi
export APE_ATTN_REQUIRE_KERNELS=1
dev=$(bash emulator/build-emulated-device.sh | tail -n 1) || { echo "building the emulated device failed" >&2; exit 1; }
export LD_LIBRARY_PATH="$dev${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export APE_GPU_QUICK=1
export APE_MODEL=${APE_MODEL:-$(bash scripts/fetch-model.sh | tail -n 1)}
export APE_FIXTURES=${APE_FIXTURES:-$root/ape-llama/tests/fixtures}
# The same features as scripts/test.sh's `cargo test`, so its binaries are reused.
features=(--release --features emulator)
logs=$root/target/emulated-gpu-logs
rm -rf "$logs" && mkdir -p "$logs"

passed=0
failed=0
failures=()
pass() { passed=$((passed + ${2:-1})); echo "ok: $1"; }
fail() { failed=$((failed + 1)); failures+=("$1"); echo "FAILED: $1 (log: ${3:-})"; [ -n "${3:-}" ] && tail -n "${2:-30}" "$3"; }

echo "== emulated device: $dev"

# 1. The GPU tests. Each binary's libtest line is read: all passed, none failed, none ignored.
for f in tests/cuda_device.rs tests/gpu_*.rs ape-llama/tests/gpu_*.rs; do
  t=$(basename "$f" .rs)
  log=$logs/test_$t.log
  start=$SECONDS
  cargo test "${features[@]}" --test "$t" -- --include-ignored > "$log" 2>&1
  rc=$?
  line=$(grep -E '^test result' "$log" | tail -n 1)
  echo "   $t: ${line:-no result line} ($((SECONDS - start)) s)"
  read -r n_pass n_fail n_ignored < <(echo "$line" |
    sed -E 's/.* ([0-9]+) passed; ([0-9]+) failed; ([0-9]+) ignored.*/\1 \2 \3/')
  if [ "$rc" -eq 0 ] && [ "${n_fail:-1}" = 0 ] && [ "${n_ignored:-1}" = 0 ] && [ "${n_pass:-0}" -gt 0 ]; then
    pass "$f ($n_pass tests)" "$n_pass"
  else
    fail "$f (rc $rc, ${n_fail:-?} failed, ${n_ignored:-?} ignored)" 40 "$log"
  fi
done

# 2. The example: one batched decode step of two requests against the oracle.
log=$logs/example_kv_pool_decode.log
if cargo run "${features[@]}" --quiet --example kv_pool_decode > "$log" 2>&1; then
  pass "examples/kv_pool_decode.rs: $(grep -iE 'rel|ok' "$log" | tail -n 1)"
else
  fail "examples/kv_pool_decode.rs" 20 "$log"
fi

# 3. The demo on the GPU forward pass and on the CPU: the same four answers.
cargo build "${features[@]}" --quiet --bin ape
demo_rc=0
for d in cpu cuda; do
  start=$SECONDS
  target/release/ape demo --device "$d" > "$logs/demo_$d.log" 2>&1
  rc=$?
  [ "$rc" -eq 0 ] || demo_rc=$rc
  echo "   ape demo --device $d: rc $rc ($((SECONDS - start)) s)"
done
grep -E '^\[' "$logs/demo_cpu.log" > "$logs/answers_cpu.txt"
grep -E '^\[' "$logs/demo_cuda.log" > "$logs/answers_cuda.txt"
diff "$logs/answers_cpu.txt" "$logs/answers_cuda.txt" > "$logs/answers.diff"
same=$?
# The GPU run must have run on the (emulated) GPU: its first line names it.
if [ "$demo_rc" -eq 0 ] && [ "$(wc -l < "$logs/answers_cpu.txt")" -eq 4 ] && [ "$same" -eq 0 ] \
  && grep -q '^device: GPU 0, .*(emulated)' "$logs/demo_cuda.log"; then
  pass "ape demo --device cuda: the four answers of --device cpu"
  sed 's/^/   /' "$logs/answers_cuda.txt"
else
  fail "ape demo --device cuda vs --device cpu" 30 "$logs/demo_cuda.log"
  cat "$logs/answers.diff"
fi

# 3b. The server on the GPU forward pass: requests sent together are decoded in shared steps
# (one batched attention launch per layer) and answer as the same requests one at a time.
log=$logs/serve_cuda.log
start=$SECONDS
if python3 scripts/serve_batch_check.py target/release/ape "$APE_MODEL" cuda > "$log" 2>&1; then
  pass "ape serve --device cuda: the answers of single requests, $(tail -n 1 "$log") ($((SECONDS - start)) s)"
else
  fail "ape serve --device cuda: concurrent answers against single requests" 30 "$log"
fi

# 4. The GPU session's quick phase, dry-run on a bundle of this build.
if [ "${APE_EMU_GPU_SKIP_SESSION:-0}" != 1 ]; then
  log=$logs/session_dry_run.log
  if bash scripts/gpu/dry-run.sh > "$log" 2>&1; then
    pass "session.sh quick, dry run: $(tail -n 1 "$log")"
  else
    fail "session.sh quick, dry run" 60 "$log"
  fi
fi

echo
if [ "$failed" -gt 0 ]; then
  printf 'failed: %s\n' "${failures[@]}"
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
