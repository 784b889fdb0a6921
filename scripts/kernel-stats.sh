#!/usr/bin/env bash
# The kernels' static numbers (docs/KERNEL-STATS.md): compiles kernels/*.cu with the pinned CUDA
# 13.0 compiler and build.rs's flags, and reads registers, spills and shared memory from ptxas and
# the attention kernels' main loops from the SASS (the pinned nvdisasm). Arguments go to
# scripts/kernel-stats.py: none prints the table, --write records it in docs/KERNEL-STATS.md,
# --check fails on any spill and on a main loop grown past the recorded table by more than 5%.
#
# Always the pinned tools (scripts/install-nvcc.sh installs them when missing), whatever nvcc the
# build found: the recorded table is that compiler's code, and another one's would not compare.
set -euo pipefail
cd "$(dirname "$0")/.."
nvcc=$(bash scripts/install-nvcc.sh | tail -n 1)
exec python3 scripts/kernel-stats.py --nvcc "$nvcc" "$@"
