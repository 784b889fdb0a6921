#!/usr/bin/env bash
# One GPU session's work, run on the device machine from the repository root:
#   bash gpu-bundle/session.sh
# GPU tests (ignored ones included), compute-sanitizer memcheck and racecheck on a reduced sweep,
# the criterion kernel benchmarks, the PyTorch peer on identical shapes, and the summary tables.
# Everything lands in $OUT (or gpu-out/ when OUT is unset).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-gpu-out}
mkdir -p "$out"
bin="$here/bin"
log() { echo "== $*" | tee -a "$out/session.log"; }

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  cat "$here/BUILD_INFO"
} > "$out/device.txt" 2>&1
cat "$out/device.txt"

status=0
for t in cuda_device gpu_merge_states gpu_rope gpu_llama_ops gpu_segmented_attention gpu_llama; do
  log "test $t"
  extra=()
  # The real-model comparison needs the model carried (APE_MODEL=path to the GGUF).
  [ "$t" = gpu_llama ] && [ -z "${APE_MODEL:-}" ] && extra=(--skip real_model)
  if ! "$bin/$t" --include-ignored --test-threads=1 --nocapture "${extra[@]}" > "$out/test_$t.log" 2>&1; then
    status=1
    log "FAILED: $t (see test_$t.log)"
  fi
  tail -n 3 "$out/test_$t.log" | tee -a "$out/session.log"
done

for tool in memcheck racecheck; do
  for t in gpu_merge_states gpu_rope gpu_llama_ops gpu_segmented_attention; do
    log "compute-sanitizer --tool $tool $t (APE_GPU_QUICK=1)"
    APE_GPU_QUICK=1 timeout 900 compute-sanitizer --tool "$tool" --error-exitcode 99 \
      "$bin/$t" --include-ignored --test-threads=1 > "$out/sanitizer_${tool}_$t.log" 2>&1
    rc=$?
    [ $rc -ne 0 ] && status=1
    echo "rc=$rc" | tee -a "$out/session.log"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|test result" "$out/sanitizer_${tool}_$t.log" \
      | tail -n 3 | tee -a "$out/session.log"
  done
done

log "benchmarks"
CRITERION_HOME="$out/criterion" "$bin/kernels" --bench > "$out/bench.log" 2>&1 || status=1
tail -n 5 "$out/bench.log"
log "end to end (synthetic Llama-3-8B, TTFT 4K-128K; APE_E2E_MAX caps the context)"
timeout 420 "$bin/e2e" > "$out/e2e.jsonl" 2> "$out/e2e.log" || { status=1; log "e2e stopped early (see e2e.log)"; }
cat "$out/e2e.jsonl"
log "peer (PyTorch)"
python3 "$here/peer.py" > "$out/peer.json" 2> "$out/peer.log" || status=1
log "summary"
python3 "$here/summarize.py" "$out" > "$out/summary.md" 2>> "$out/session.log" || status=1
cat "$out/summary.md"
exit $status
