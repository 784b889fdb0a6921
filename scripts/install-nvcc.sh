#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler from PyPI into .tools/cuda (git-ignored), with the
# disassembler the static speed check reads its code with (nvdisasm, beside nvcc), and prints the
# path of nvcc on its last line. Does nothing when they are already there.
#
# The versions are pinned to what the GPU machines' driver (CUDA 13.0) can load: a newer nvcc
# emits PTX that a 13.0 driver refuses. See docs/DESIGN.md §4.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.tools/cuda"
pins=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
)
# The disassembler that scripts/kernel-stats.sh reads the compiled kernels with. PyPI has no 13.0
# release of it; 13.2.51 is the oldest there, and it reads the 13.0 compiler's sm_80 and sm_90a
# code (it only reads: the code built and shipped is the pinned compiler's). Installed beside the
# compiler, into the same folder, without reinstalling the compiler.
tool_pins=(
  nvidia-cuda-nvdisasm==13.2.51
)
stamp="$venv/.installed-$(printf '%s\n' "${pins[@]}" | sha256sum | cut -c1-16)"
tool_stamp="$venv/.tools-$(printf '%s\n' "${tool_pins[@]}" | sha256sum | cut -c1-16)"

find_nvcc() {
  local site
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$site/nvidia/cu13/bin/nvcc"
}

if [ ! -f "$stamp" ]; then
  echo "installing the pinned CUDA 13.0 compiler into $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${pins[@]}" >&2
  touch "$stamp"
fi

if [ ! -f "$tool_stamp" ]; then
  echo "installing the pinned disassembler (${tool_pins[*]}) into $venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${tool_pins[@]}" >&2
  touch "$tool_stamp"
fi

nvcc=$(find_nvcc)
if [ ! -x "$nvcc" ] || [ ! -x "$(dirname "$nvcc")/nvdisasm" ]; then
  echo "install-nvcc: nvcc or nvdisasm not found in $(dirname "$nvcc") after installing ${pins[*]} ${tool_pins[*]}" >&2
  exit 1
fi
echo "$nvcc"
