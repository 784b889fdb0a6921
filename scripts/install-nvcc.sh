#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler from PyPI into .tools/cuda (git-ignored) and prints the
# path of nvcc on its last line. Does nothing when that nvcc is already there.
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
stamp="$venv/.installed-$(printf '%s\n' "${pins[@]}" | sha256sum | cut -c1-16)"

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

nvcc=$(find_nvcc)
if [ ! -x "$nvcc" ]; then
  echo "install-nvcc: nvcc not found at $nvcc after installing ${pins[*]}" >&2
  exit 1
fi
echo "$nvcc"
