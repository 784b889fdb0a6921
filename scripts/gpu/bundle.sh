#!/usr/bin/env bash
# Builds the GPU test and benchmark binaries here (the GPU machine has no Rust) and collects them,
# stripped, with the GPU scripts in gpu-bundle/ (git-ignored). Carry gpu-bundle to the device and
# run `bash gpu-bundle/session.sh` there.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=gpu-bundle
rm -rf "$out" && mkdir -p "$out/bin"

if [ -z "${NVCC:-}" ] && ! command -v nvcc >/dev/null 2>&1; then
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
    # Test and bench targets only (the ape binary is not needed on the device).
    if msg.get("reason") == "compiler-artifact" and exe and "bin" not in msg["target"]["kind"]:
        print(msg["target"]["name"], exe)
'
}

{
  cargo test --release --no-run --message-format=json --test gpu_merge_states \
    --test gpu_segmented_attention --test gpu_rope --test gpu_llama_ops --test gpu_llama --test cuda_device
  cargo bench --no-run --message-format=json --bench kernels --bench e2e
} | executables | while read -r name exe; do
  cp "$exe" "$out/bin/$name"
  strip "$out/bin/$name"
done
cp scripts/gpu/session.sh scripts/gpu/peer.py scripts/gpu/summarize.py "$out/"
cargo run --release --quiet --bin ape -- info > "$out/BUILD_INFO"
git rev-parse HEAD >> "$out/BUILD_INFO"
du -sh "$out"
ls -la "$out/bin"
