#!/usr/bin/env bash
# Builds the GPU test and benchmark binaries here (the GPU machine has no Rust) and collects, in
# gpu-bundle/ (git-ignored), everything a GPU session needs beside the repository:
#   bin.tar.xz    the binaries, stripped and xz-compressed (they share most of their bytes:
#                 about 41 MB -> 2.3 MB); session.sh unpacks them into /tmp there
#   model/        the real model cut to its first APE_CUT_LAYERS blocks (default 8) by
#                 scripts/gpu/cut-model.py, checked here with `ape inspect` and a CPU forward pass
#   fixtures/     the llama.cpp fixture the real-model test reads (APE_FIXTURES)
#   session.sh, peer.py, summarize.py, BUILD_INFO
# Carry gpu-bundle to the device and run `bash gpu-bundle/session.sh quick` there (DEVELOPERS.md).
# The session's dry run on the emulated device (scripts/gpu/dry-run.sh) builds its own bundle
# elsewhere: APE_BUNDLE_DIR (the folder), APE_BUNDLE_FEATURES (cargo features of the binaries,
# to reuse the test command's build), APE_BUNDLE_XZ_PRESET (compression, default 9 extreme) and
# APE_BUNDLE_LIMIT_MIB (0: no size limit; a bundle that only runs here need not travel).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${APE_BUNDLE_DIR:-gpu-bundle}
layers=${APE_CUT_LAYERS:-8}
limit_mib=${APE_BUNDLE_LIMIT_MIB:-60} # what travels must stay under 64 MiB; the rest is margin
features=()
[ -n "${APE_BUNDLE_FEATURES:-}" ] && features=(--features "$APE_BUNDLE_FEATURES")
rm -rf "$out" && mkdir -p "$out/model" "$out/fixtures"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir "$stage/bin"

if [ -z "${NVCC:-}" ] && ! command -v nvcc > /dev/null 2>&1; then
  NVCC=$(bash scripts/install-nvcc.sh | tail -n 1)
  export NVCC
fi
export APE_ATTN_REQUIRE_KERNELS=1

executables() {
  python3 -c '
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    exe = msg.get("executable")
    # Test, bench and example targets only (the ape binary is not needed on the device).
    if msg.get("reason") == "compiler-artifact" and exe and "bin" not in msg["target"]["kind"]:
        print(msg["target"]["name"], exe)
'
}

{
  cargo test --release "${features[@]}" --no-run --message-format=json --test gpu_merge_states \
    --test gpu_segmented_attention --test gpu_rope --test gpu_llama_ops --test gpu_llama --test cuda_device \
    --test gpu_driver --test gpu_driver_faults --test gpu_cublas
  cargo bench "${features[@]}" --no-run --message-format=json --bench kernels --bench e2e
  cargo build --release "${features[@]}" --message-format=json --example kv_pool_decode
} | executables | while read -r name exe; do
  cp "$exe" "$stage/bin/$name"
  strip "$stage/bin/$name"
done
for t in gpu_merge_states gpu_segmented_attention gpu_rope gpu_llama_ops gpu_llama cuda_device kernels e2e \
  kv_pool_decode gpu_driver gpu_driver_faults gpu_cublas; do
  [ -x "$stage/bin/$t" ] || { echo "bundle.sh: $t was not built" >&2; exit 1; }
done
# xz's large window finds what the binaries share (gzip's 32 KiB one does not); the device
# unpacks it with Python's lzma, which is always there.
python3 - "$stage" "$out/bin.tar.xz" "${APE_BUNDLE_XZ_PRESET:-9e}" << 'PY'
import lzma, sys, tarfile
stage, dest, preset = sys.argv[1:]
level = int(preset.rstrip("e")) | (lzma.PRESET_EXTREME if preset.endswith("e") else 0)
with tarfile.open(dest, "w:xz", preset=level) as t:
    t.add(f"{stage}/bin", arcname="bin")
PY

cargo build --release "${features[@]}" --quiet --bin ape
ape=target/release/ape
model=$(bash scripts/fetch-model.sh | tail -n 1)
cut="$out/model/$(basename "$model" .gguf).first$layers.gguf"
python3 scripts/gpu/cut-model.py "$model" "$cut" "$layers"
# The cut model must load and run here, or the real-model test there would only fail.
$ape inspect --model "$cut" > "$stage/inspect.txt"
grep -q "llama.block_count = U64($layers)" "$stage/inspect.txt" \
  || { echo "bundle.sh: $cut does not report $layers blocks" >&2; exit 1; }
echo "The capital of France is Paris." > "$stage/context.txt"
$ape run --model "$cut" --context "$stage/context.txt" --question "What is the capital of France?" \
  --mode sequential --no-store --print-logits 3 > "$stage/logits.txt" \
  || { echo "bundle.sh: the CPU forward pass fails on $cut" >&2; exit 1; }
echo "cut model, top logits at the first answer position:" && cat "$stage/logits.txt"

cp ape-llama/tests/fixtures/smollm2_llamacpp.json "$out/fixtures/"
cp scripts/gpu/session.sh scripts/gpu/peer.py scripts/gpu/summarize.py "$out/"
$ape info > "$out/BUILD_INFO"
echo "commit $(git rev-parse HEAD)$(git diff --quiet HEAD || echo ' (with uncommitted changes)')" >> "$out/BUILD_INFO"
echo "model $(basename "$cut"): the first $layers blocks of $(basename "$model")" >> "$out/BUILD_INFO"

ls -l "$out" "$out/model"
bundle=$(du -sb "$out" | cut -f1)
# The tracked files that exist (one deleted but not yet committed does not travel).
repo=$(git ls-files -z | python3 -c '
import os, sys
names = sys.stdin.buffer.read().split(b"\0")
print(sum(os.path.getsize(n) for n in names if n and os.path.isfile(n)))')
echo "gpu-bundle $((bundle / 1048576)) MiB + tracked files $((repo / 1048576)) MiB travel (limit 64 MiB)"
if [ "$limit_mib" -gt 0 ] && [ $((bundle + repo)) -gt $((limit_mib * 1048576)) ]; then
  echo "bundle.sh: over ${limit_mib} MiB; cut fewer layers (APE_CUT_LAYERS)" >&2
  exit 1
fi
