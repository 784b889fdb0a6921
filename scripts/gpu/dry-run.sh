#!/usr/bin/env bash
# The GPU session's quick phase, dry-run here on the emulated device: builds a bundle of this
# build (scripts/gpu/bundle.sh, into target/gpu-bundle-dry-run, with the test command's cargo
# features so nothing is compiled twice), then runs `session.sh quick` from it with the emulated
# device on the library path and stand-ins for what only the GPU machine has (dry-run/: PyTorch's
# peer.py, compute-sanitizer). Checks that every step ran and passed, wrote its results, and that
# the summary has a number in every table the quick phase fills. The key counts are shrunk
# (APE_BENCH_SHRINK=256): the emulator runs a kernel thousands of times slower than a GPU.
# Prints one line at the end; exits non-zero on any failure. Needs the emulated device built
# (emulator/build-emulated-device.sh; scripts/test-emulated-gpu.sh does both).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
dev=$root/target/emulated-device
[ -e "$dev/libcuda.so.1" ] || { echo "dry-run: build the emulated device first" >&2; exit 1; }
bundle=$root/target/gpu-bundle-dry-run
scratch=$(mktemp -d "${TMPDIR:-/tmp}/ape-dry-run.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

echo "== bundle (scripts/gpu/bundle.sh) into $bundle"
APE_BUNDLE_DIR=$bundle APE_BUNDLE_FEATURES=${APE_BUNDLE_FEATURES:-emulator} APE_BUNDLE_XZ_PRESET=0 \
  APE_BUNDLE_LIMIT_MIB=0 bash scripts/gpu/bundle.sh > "$scratch/bundle.log" 2>&1 \
  || { tail -n 30 "$scratch/bundle.log"; echo "dry-run: bundle.sh failed" >&2; exit 1; }

echo "== session.sh quick on the emulated device"
out=$scratch/out
rc=0
skip="--skip sdpa_comparison_cases --skip fused_shift_against_separate_shift \
--skip back_to_back_prepares --skip synthetic_llama3_8b"
# The session's test steps skip what scripts/test-emulated-gpu.sh has just run in full there
# (APE_SESSION_TEST_ARGS, libtest filters): the dry run checks the steps, not the tests again.
env -u APE_MODEL -u APE_FIXTURES -u APE_GPU_QUICK \
  PATH="$root/scripts/gpu/dry-run:$PATH" LD_LIBRARY_PATH="$dev${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  TMPDIR=$scratch OUT=$out APE_BENCH_SHRINK=256 APE_SESSION_PEER="$root/scripts/gpu/dry-run/peer.py" \
  APE_SESSION_TEST_ARGS="${APE_SESSION_TEST_ARGS-$skip}" \
  bash "$bundle/session.sh" quick > "$scratch/session.log" 2>&1 || rc=$?
cat "$scratch/session.log"
[ "$rc" -eq 0 ] || { echo "dry-run: session.sh quick exited with $rc" >&2; exit 1; }

# What came back: the summary, the step log and the results tarball, nothing over the 8 files.
for f in quick.md quick.log quick-results.tar.gz; do
  [ -s "$out/$f" ] || { echo "dry-run: $f missing from \$OUT" >&2; exit 1; }
done
[ "$(find "$out" -type f | wc -l)" -le 8 ] || { echo "dry-run: more than 8 files in \$OUT" >&2; exit 1; }
mkdir "$scratch/results" && tar xzf "$out/quick-results.tar.gz" -C "$scratch/results"
python3 - "$out/quick.md" "$scratch/results" << 'PY'
import json, os, re, sys
md, res = open(sys.argv[1]).read(), sys.argv[2]
errors = []
steps = re.findall(r"^\| quick \| (\S+) \| ([^|]+) \|", md, re.M)
want = ["test_cuda_device", "test_gpu_driver", "test_gpu_driver_faults", "test_gpu_cublas",
        "test_gpu_merge_states", "test_gpu_rope", "test_gpu_llama_ops",
        "test_gpu_segmented_attention", "example_kv_pool_decode", "test_gpu_llama",
        "sanitizer_memcheck_gpu_segmented_attention", "kernels", "peer", "summary"]
if [s for s, _ in steps] != want:
    errors.append(f"steps {[s for s, _ in steps]}, expected {want}")
errors += [f"step {s}: {r.strip()}" for s, r in steps if r.strip() != "ok"]
for s in want:
    if s.startswith(("test_", "sanitizer_")):
        log = open(os.path.join(res, "quick", s + ".log")).read()
        if not re.search(r"^test result: ok\. [1-9]\d* passed; 0 failed", log, re.M):
            errors.append(f"{s}.log: no passing libtest result")
if "ERROR SUMMARY: 0 errors" not in md:
    errors.append("no sanitizer summary line in quick.md")
crit = [r for r, _, f in os.walk(os.path.join(res, "quick", "criterion"))
        if r.endswith("new") and "estimates.json" in f]
if len(crit) != 13:
    errors.append(f"{len(crit)} criterion results, expected 13")
json.load(open(os.path.join(res, "quick", "peer.json")))
# The summary's tables: a number (not n/a) for ours and the peer in each row the phase fills.
rows = {
    "prefill": r"^\| q32_k32 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|",
    "short question": r"^\| 64 \| 128 \| 16 \| [\d.]+ \| [\d.]+ \| [\d.]+ \|",
    "decode": r"^\| 1 \| 512 \| 16 \| [\d.]+ \| [\d.]+ \| [\d.]+ \|",
    "batch": r"^\| n2_k16_s4 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|",
    "copy": r"Device-to-device copy: ours [\d.]+ GB/s, torch [\d.]+ GB/s",
    "wide tile": r"^\| d64_q32_k32 \| [\d.]+ \| wide \| [\d.]+ \| [\d.]+ \|",
    "decode tile": r"^\| d128_rows1_k512_s16 \| [\d.]+ \| decode \| [\d.]+ \| [\d.]+ \|",
}
for what, pattern in rows.items():
    if not re.search(pattern, md, re.M):
        errors.append(f"summary: no {what} row with numbers ({pattern})")
if errors:
    sys.exit("dry-run: " + "; ".join(errors))
print(f"{len(steps)} steps ok, {len(crit)} benchmarks, summary tables filled")
PY
