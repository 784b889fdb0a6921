#!/usr/bin/env bash
# One GPU session's work on the device machine, run from the repository root, in phases that each
# fit one device-tool call (a call is killed at 600 s, and at most 8 files come back from $OUT).
# A session has 15 minutes of device time in all, the machine's start included: its one call is
#   bash gpu-bundle/session.sh quick      at most 8 minutes: the GPU tests (reduced sweep), the GPU
#                                         forward pass against the CPU on the cut model,
#                                         compute-sanitizer memcheck on the attention tests, the
#                                         core benchmarks with their peers, the summary last
# and the phases below stay for a later call:
#   bash gpu-bundle/session.sh test       GPU tests, ignored ones too, and the real model (cut)
#   bash gpu-bundle/session.sh sanitize   compute-sanitizer memcheck and racecheck, reduced sweep
#   bash gpu-bundle/session.sh bench      kernel benchmarks, SDPA accuracy, TTFT to 32K, peer, summary
#   bash gpu-bundle/session.sh e2e        TTFT of the synthetic Llama-3-8B up to 128K
#   bash gpu-bundle/session.sh profile    Nsight Compute counters of the attention kernels
#   bash gpu-bundle/session.sh all        the five in sequence, with no phase deadline
# A phase leaves in $OUT (gpu-out/ when OUT is unset) PHASE.md (the summary), PHASE.log (the step
# log), PHASE-results.tar.gz (every log, criterion's JSON, e2e.jsonl, peer.json, device.txt) and,
# from bench, summarize.py's plot_*.png (3 at most), from profile, the ncu_*.ncu-rep reports (3 at
# most): 6 files at most, 7 while a tarball is being replaced. The tarball is rewritten after every
# step, so a call killed at its limit still brings back what the finished steps wrote.
set -uo pipefail

# Budgets, in seconds. Each step runs under `timeout` with its budget, cut to what is left of the
# phase's: no step runs past PHASE_BUDGET - RESERVE, so a hung kernel costs its own step only.
PHASE_BUDGET=${APE_PHASE_BUDGET:-540} # a device call is killed at 600 s
QUICK_BUDGET=465                      # quick: 8 minutes with the unpacking and the packing
# quick (465). On an H100 each test binary takes seconds; the budgets bound a hang.
T_Q_TEST=20          # each of the small test binaries
T_Q_SEGMENTED=60     # gpu_segmented_attention, reduced sweep
T_Q_LLAMA=60         # gpu_llama: the cut real model and a synthetic Llama-3-8B, GPU against CPU
T_Q_MEMCHECK=70      # memcheck on gpu_segmented_attention, reduced sweep
T_Q_KERNELS=105      # benches/kernels.rs, APE_BENCH_SET=quick (13 benchmarks)
T_Q_PEER=45
T_Q_SUMMARY=15
RESERVE=15                            # kept at the end of a phase for packing
KILL_AFTER=5                          # SIGKILL this long after a step's SIGTERM
# test (520)
T_CUDA_DEVICE=30 # and each of gpu_driver, gpu_driver_faults, gpu_cublas
T_EXAMPLE=10 # examples/kv_pool_decode.rs: one batched decode step against the oracle
T_MERGE_STATES=60
T_ROPE=60
T_LLAMA_OPS=90
T_SEGMENTED=150
T_LLAMA=120 # includes the real model (cut to its first layers) on the CPU and the GPU
# sanitize, APE_GPU_QUICK=1, per test binary (4 x 50 + 4 x 75 = 500)
T_MEMCHECK=50
T_RACECHECK=75
# bench (505: 20 s of the phase's 525 left for unpacking, nvidia-smi and packing)
# criterion, 53 benchmarks, each saving its JSON when done (about 110-130 s, a desk estimate). Its
# --warm-up-time, --measurement-time and --sample-size would not shorten them: benches/kernels.rs
# sets those per group, which wins.
T_KERNELS=220
T_SDPA_CASES=45
T_E2E=120      # with APE_E2E_MAX (default E2E_MAX_BENCH)
T_PEER=90
T_SUMMARY=30
E2E_MAX_BENCH=32768
# e2e (500)
T_E2E_FULL=500 # with APE_E2E_MAX (default E2E_MAX_FULL)
E2E_MAX_FULL=131072
# profile (3 x (150 + 20) = 510): ncu on one criterion benchmark each (the bench binary sets up
# every group's inputs first, tens of seconds, before the one benchmark runs), then its report as
# text.
T_NCU=150
T_NCU_TEXT=20
# The profiled benchmarks (criterion ids; the filter is a regex): compute-bound prefill (whole
# mode), a short question and a decode row over 128K keys (split mode, memory-bound).
NCU_CASES=(prefill:prefill/plain/q4096_k32768
  short:short_question_and_decode/rows64/k131072_s16
  decode:short_question_and_decode/rows1/k131072_s16)

usage() {
  echo "usage: bash gpu-bundle/session.sh quick|test|sanitize|bench|e2e|profile|all" >&2
  exit 2
}
[ $# -eq 1 ] || usage
tag=$1
case $tag in
  quick) phases=(quick) && PHASE_BUDGET=${APE_PHASE_BUDGET:-$QUICK_BUDGET} ;;
  test | sanitize | bench | e2e | profile) phases=("$tag") ;;
  all) phases=(test sanitize bench e2e profile) && PHASE_BUDGET=1000000000 ;;
  *) usage ;;
esac

here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-gpu-out}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/ape-gpu-$tag.XXXXXX")

# cudarc opens libcublas by name at run time (libcublas.so, .so.13, .so.12, ...). When the loader
# knows none, look where a CUDA toolkit or PyTorch's pip wheels keep one, and add that directory.
# (grep reads all of ldconfig's output: with -q it could exit first, and pipefail would then
# read ldconfig's SIGPIPE as "not found".)
if ! ldconfig -p 2>/dev/null | grep 'libcublas\.so' > /dev/null; then
  dirs=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib)
  while IFS= read -r d; do dirs+=("$d"); done < <(python3 -c \
    'import site; print("\n".join(site.getsitepackages()))' 2>/dev/null)
  cublas=$(find "${dirs[@]}" -maxdepth 4 -name 'libcublas.so*' 2>/dev/null | head -n 1)
  if [ -n "$cublas" ]; then
    LD_LIBRARY_PATH="$(dirname "$cublas")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export LD_LIBRARY_PATH
    echo "libcublas: $cublas (added to LD_LIBRARY_PATH)"
  else
    echo "libcublas: not found; the GPU forward pass tests and the e2e benchmark will say so"
  fi
fi
status=0
deadline=$(($(date +%s) + PHASE_BUDGET))
dir=$work # the current phase's folder
log() { echo "== $*" | tee -a "$work/session.log"; }

# The summary: each step's result, the failures' last lines, then what the phase measured.
report() {
  local p f name result
  echo "# GPU session: $tag"
  echo
  sed -n '1,3p' "$work/device.txt"
  echo
  echo "| phase | step | result | seconds | budget |"
  echo "|---|---|---|---|---|"
  sed 's/\t/ | /g; s/^/| /; s/$/ |/' "$work/steps.tsv"
  for p in "${phases[@]}"; do
    [ -d "$work/$p" ] || continue
    case $p in
      test | quick)
        echo -e "\n## $p: tests\n"
        for f in "$work/$p"/test_*.log; do
          [ -f "$f" ] || continue
          echo "- $(basename "$f" .log): $(grep -E '^test result' "$f" | tail -n 1)"
          # The names in libtest's last "failures:" list.
          awk '/^failures:$/ { k = 0; next } /^    [^ ]/ { a[++k] = $1 } END { for (i = 1; i <= k; i++) print "  - FAILED " a[i] }' "$f"
        done
        ;;
    esac
    case $p in
      sanitize | quick)
        echo -e "\n## $p: compute-sanitizer (APE_GPU_QUICK=1)\n"
        for f in "$work/$p"/sanitizer_*.log; do
          [ -f "$f" ] || continue
          echo "- $(basename "$f" .log):$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$f" | tail -n 1 | tr -d '=');" \
            "$(grep -E '^test result' "$f" | tail -n 1)"
        done
        ;;
    esac
    case $p in
      bench | quick)
        echo -e "\n## $p: benchmarks\n"
        [ -s "$work/$p/summary.md" ] && cat "$work/$p/summary.md"
        ;;
      e2e)
        echo -e "\n## e2e (ttft_ms; summarize.py puts these in a table when given a folder with e2e.jsonl)\n"
        echo '```'
        cat "$work/e2e/e2e.jsonl" 2>/dev/null
        echo '```'
        ;;
      profile)
        echo -e "\n## profile (ncu --set full; the details pages are ncu_*.txt in the tarball, the reports ncu_*.ncu-rep beside it)\n"
        for f in "$work/profile"/ncu_*.txt; do
          [ -f "$f" ] || continue
          echo "### $(basename "$f" .txt)"
          echo '```'
          ncu_digest < "$f"
          echo '```'
        done
        ;;
    esac
  done
  # Each failed or stopped step's first panics, or else the end of its log.
  while IFS=$'\t' read -r p name result _; do
    f=$work/$p/$name.log
    case $result in ok | skipped* | *"not found") continue ;; esac
    [ -f "$f" ] || continue
    echo -e "\n### $p/$name: $result\n"
    echo '```'
    if grep -q 'panicked at' "$f"; then
      grep -m 4 -A 1 'panicked at' "$f"
    else
      tail -n 15 "$f"
    fi
    echo '```'
  done < "$work/steps.tsv"
}

# The lines of an `ncu --page details` report worth reading first: each kernel's header (name,
# grid, block), then its durations, throughputs, occupancy, registers and shared memory.
ncu_digest() {
  grep -E '^  [A-Za-z_][A-Za-z0-9_]* \(|^    (Duration|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|L1/TEX Hit Rate|L2 Hit Rate|Achieved Occupancy|Theoretical Occupancy|Registers Per Thread|Dynamic Shared Memory Per Block|Block Limit [A-Za-z ]+|Issue Slots Busy|Executed Ipc Active|Warp Cycles Per Issued Instruction|Waves Per SM) ' \
    | sed 's/  */ /g'
}

# An NVIDIA tool: on PATH, beside nvcc (through a link to it too), in a CUDA toolkit's usual
# places, or (ncu) in Nsight Compute's own folders. Prints its path, or nothing.
find_tool() {
  local name=$1 found nvcc c
  found=$(command -v "$name") && { echo "$found"; return; }
  local dirs=(/usr/local/cuda/bin /usr/local/cuda-*/bin /opt/nvidia/nsight-compute/* /usr/local/NVIDIA-Nsight-Compute*)
  nvcc=$(command -v nvcc) && dirs=("$(dirname "$(readlink -f "$nvcc")")" "${dirs[@]}")
  for c in "${dirs[@]}"; do
    [ -x "$c/$name" ] && echo "$c/$name" && return
  done
}

# Packs everything into $out/$tag-results.tar.gz and refreshes the top-level files.
pack() {
  report > "$out/$tag.md" 2>&1
  cp "$work/session.log" "$out/$tag.log"
  if tar czf "$out/$tag-results.tmp" -C "$work" . 2>> "$work/session.log"; then
    mv -f "$out/$tag-results.tmp" "$out/$tag-results.tar.gz"
  else
    rm -f "$out/$tag-results.tmp"
  fi
}

# step NAME BUDGET [--stdout FILE] CMD...: runs CMD in the phase folder under timeout; its output
# goes to NAME.log (stdout to FILE instead, when given). Records the result, then packs.
step() {
  local name=$1 budget=$2 stdout=""
  shift 2
  if [ "${1:-}" = --stdout ]; then
    stdout=$2
    shift 2
  fi
  local now left t rc took result
  now=$(date +%s)
  left=$((deadline - RESERVE - now))
  t=$((budget < left ? budget : left))
  if [ "$t" -lt 5 ]; then
    result="skipped: ${left}s left of the phase"
    took=0
    status=1
  else
    log "$p/$name (budget ${t}s)"
    if [ -n "$stdout" ]; then
      (cd "$dir" && timeout -k "$KILL_AFTER" "$t" "$@" > "$stdout" 2> "$name.log")
    else
      (cd "$dir" && timeout -k "$KILL_AFTER" "$t" "$@" > "$name.log" 2>&1)
    fi
    rc=$?
    took=$(($(date +%s) - now))
    if [ "$rc" -eq 0 ]; then
      result=ok
    elif [ "$rc" -eq 124 ] || { [ "$rc" -eq 137 ] && [ "$took" -ge "$t" ]; }; then
      result="TIMEOUT after ${t}s"
      status=1
    else
      result="FAILED rc=$rc"
      status=1
    fi
  fi
  log "$p/$name: $result (${took}s)"
  printf '%s\t%s\t%s\t%s\t%s\n' "$p" "$name" "$result" "$took" "$budget" >> "$work/steps.tsv"
  pack
}

# Records a step that could not run (a missing tool): counts as a failure, not a pass.
missing() {
  log "$p/$1: $2"
  printf '%s\t%s\t%s\t0\t0\n' "$p" "$1" "FAILED: $2" >> "$work/steps.tsv"
  status=1
}

# The peer (PyTorch); the dry run on the emulated device names a stand-in.
peer=${APE_SESSION_PEER:-$here/peer.py}
# Extra libtest arguments for every test step (the dry run skips what it has just run).
read -r -a test_args <<< "${APE_SESSION_TEST_ARGS:-}"

touch "$work/steps.tsv"
{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  if command -v nvidia-smi > /dev/null; then
    timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  else
    echo "nvidia-smi: not found"
  fi
  cat "$here/BUILD_INFO"
} > "$work/device.txt" 2>&1
cat "$work/device.txt"

# The binaries travel compressed (bin.tar.xz); unpack them once per machine into /tmp.
archive="$here/bin.tar.xz"
if [ ! -f "$archive" ]; then
  echo "session.sh: $archive is missing: run scripts/gpu/bundle.sh on the build machine" >&2
  exit 2
fi
bin="${TMPDIR:-/tmp}/ape-gpu-bin-$(cksum < "$archive" | cut -d' ' -f1)"
if [ ! -x "$bin/kernels" ]; then
  log "unpacking $(basename "$archive") into $bin"
  rm -rf "$bin.tmp" && mkdir -p "$bin.tmp"
  python3 - "$archive" "$bin.tmp" << 'PY' || { echo "session.sh: cannot unpack $archive" >&2; exit 2; }
import sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    try:
        t.extractall(sys.argv[2], filter="data")
    except TypeError:  # Python before 3.12
        t.extractall(sys.argv[2])
PY
  rm -rf "$bin" && mv "$bin.tmp/bin" "$bin" && rm -rf "$bin.tmp"
fi

# The cut real model and the llama.cpp fixture travel in the bundle.
export APE_FIXTURES=${APE_FIXTURES:-$here/fixtures}
if [ -z "${APE_MODEL:-}" ]; then
  for m in "$here"/model/*.gguf; do [ -f "$m" ] && export APE_MODEL=$m; done
fi
echo "APE_MODEL=${APE_MODEL:-} APE_FIXTURES=$APE_FIXTURES" | tee -a "$work/device.txt"

for p in "${phases[@]}"; do
  dir=$work/$p
  mkdir -p "$dir"
  [ "$tag" = all ] || log "phase $p: at most ${PHASE_BUDGET}s"
  case $p in
    quick)
      # 1. Every GPU test binary but gpu_llama, reduced sweep (APE_GPU_QUICK=1), and the example.
      export APE_GPU_QUICK=1
      for t in cuda_device gpu_driver gpu_driver_faults gpu_cublas gpu_merge_states gpu_rope \
        gpu_llama_ops gpu_segmented_attention; do
        budget=$T_Q_TEST
        [ "$t" = gpu_segmented_attention ] && budget=$T_Q_SEGMENTED
        step "test_$t" "$budget" "$bin/$t" --include-ignored --test-threads=1 "${test_args[@]}"
      done
      step example_kv_pool_decode "$T_EXAMPLE" "$bin/kv_pool_decode"
      # 2. The GPU forward pass against the CPU: the cut real model, a synthetic Llama-3-8B.
      extra=()
      [ -z "${APE_MODEL:-}" ] && extra=(--skip real_model)
      step test_gpu_llama "$T_Q_LLAMA" "$bin/gpu_llama" --include-ignored --test-threads=1 \
        "${extra[@]}" "${test_args[@]}"
      # 3. memcheck on the attention tests, reduced sweep.
      cs=$(find_tool compute-sanitizer)
      if [ -z "$cs" ]; then
        missing sanitizer_memcheck_gpu_segmented_attention "compute-sanitizer not found"
      else
        step sanitizer_memcheck_gpu_segmented_attention "$T_Q_MEMCHECK" "$cs" --tool memcheck \
          --error-exitcode 99 "$bin/gpu_segmented_attention" --include-ignored --test-threads=1 \
          "${test_args[@]}"
      fi
      unset APE_GPU_QUICK
      # 4. The core benchmarks, then the peer on the same shapes, then the summary of both.
      step kernels "$T_Q_KERNELS" env APE_BENCH_SET=quick CRITERION_HOME="$dir/criterion" \
        "$bin/kernels" --bench
      step peer "$T_Q_PEER" --stdout peer.json env PYTHONUNBUFFERED=1 python3 "$peer" --quick
      step summary "$T_Q_SUMMARY" --stdout summary.md python3 "$here/summarize.py" --quick "$dir"
      pack
      ;;
    test)
      for spec in cuda_device:$T_CUDA_DEVICE gpu_driver:$T_CUDA_DEVICE gpu_driver_faults:$T_CUDA_DEVICE \
        gpu_cublas:$T_CUDA_DEVICE gpu_merge_states:$T_MERGE_STATES gpu_rope:$T_ROPE \
        gpu_llama_ops:$T_LLAMA_OPS gpu_segmented_attention:$T_SEGMENTED gpu_llama:$T_LLAMA; do
        t=${spec%%:*}
        extra=()
        # Without a model the real-model comparison cannot run: skip it rather than fail.
        [ "$t" = gpu_llama ] && [ -z "${APE_MODEL:-}" ] && extra=(--skip real_model)
        step "test_$t" "${spec#*:}" "$bin/$t" --include-ignored --test-threads=1 --nocapture "${extra[@]}"
      done
      step example_kv_pool_decode "$T_EXAMPLE" "$bin/kv_pool_decode"
      ;;
    sanitize)
      cs=$(find_tool compute-sanitizer)
      for tool in memcheck racecheck; do
        budget=$T_MEMCHECK
        [ "$tool" = racecheck ] && budget=$T_RACECHECK
        for t in gpu_merge_states gpu_rope gpu_llama_ops gpu_segmented_attention; do
          if [ -z "$cs" ]; then
            missing "sanitizer_${tool}_$t" "compute-sanitizer not found"
            continue
          fi
          step "sanitizer_${tool}_$t" "$budget" env APE_GPU_QUICK=1 "$cs" --tool "$tool" \
            --error-exitcode 99 "$bin/$t" --include-ignored --test-threads=1
        done
      done
      pack
      ;;
    bench)
      step kernels "$T_KERNELS" env CRITERION_HOME="$dir/criterion" "$bin/kernels" --bench
      # summarize.py reads our accuracy on the peer's inputs from this log.
      step test_gpu_segmented_attention "$T_SDPA_CASES" \
        "$bin/gpu_segmented_attention" sdpa_comparison_cases --include-ignored --nocapture
      step e2e "$T_E2E" --stdout e2e.jsonl env APE_E2E_MAX="${APE_E2E_MAX:-$E2E_MAX_BENCH}" "$bin/e2e"
      step peer "$T_PEER" --stdout peer.json env PYTHONUNBUFFERED=1 python3 "$peer"
      step summary "$T_SUMMARY" --stdout summary.md python3 "$here/summarize.py" "$dir"
      for png in "$dir"/plot_*.png; do [ -f "$png" ] && cp "$png" "$out/"; done
      pack
      ;;
    e2e)
      step e2e "$T_E2E_FULL" --stdout e2e.jsonl env APE_E2E_MAX="${APE_E2E_MAX:-$E2E_MAX_FULL}" "$bin/e2e"
      ;;
    profile)
      nc=$(find_tool ncu)
      for spec in "${NCU_CASES[@]}"; do
        name=ncu_${spec%%:*}
        if [ -z "$nc" ]; then
          missing "$name" "ncu not found"
          continue
        fi
        # The clocks are left alone (METHOD.md). Launches 5 and 6 of the attention kernel (one
        # launch per call, split mode included), past criterion's first iterations.
        step "$name" "$T_NCU" env CRITERION_HOME="$dir/criterion" "$nc" --clock-control none \
          --target-processes all -k 'regex:^segmented_attention_' --launch-skip 4 \
          --launch-count 2 --set full -f -o "$name" \
          "$bin/kernels" --bench --profile-time 1 "^${spec#*:}\$"
        step "${name}_text" "$T_NCU_TEXT" --stdout "$name.txt" "$nc" -i "$name.ncu-rep" \
          --page details --print-units base
        # The report itself (for ncu-ui) comes back as a file of its own, not in the tarball,
        # which must stay under the 16 MiB a returned file may have; 12 MiB each keeps the
        # three and the rest under the 64 MiB that may come back in all.
        rep=$dir/$name.ncu-rep
        if [ -f "$rep" ] && [ "$(stat -c %s "$rep")" -le $((12 << 20)) ]; then
          mv "$rep" "$out/"
        elif [ -f "$rep" ]; then
          log "$name.ncu-rep: $(stat -c %s "$rep") bytes, over 12 MiB: not returned"
          rm -f "$rep"
        fi
      done
      pack
      ;;
  esac
done

pack
cat "$out/$tag.md"
echo -e "\n== steps (phase, step, result, seconds, budget)"
column -t -s $'\t' "$work/steps.tsv" 2> /dev/null || cat "$work/steps.tsv"
echo "== $out: $(find "$out" -type f | wc -l) files (at most 8 come back): $(find "$out" -type f -printf '%P ')"
exit $status
