#!/usr/bin/env bash
# Installs llama.cpp's Python binding (llama-cpp-python, pinned; pip builds llama.cpp from source:
# several minutes the first time) with numpy and matplotlib into .tools/llamacpp, unless they are
# there already, and prints the venv's python on the last line. Used by the fixture script
# (scripts/fixtures/llamacpp.sh) and the CPU benchmark (scripts/bench-cpu.sh).
# With --server, also the binding's `server` extras (FastAPI, uvicorn, sse-starlette, ...: its
# OpenAI-compatible server, `python -m llama_cpp.server`), for the serving benchmark
# (scripts/bench-serve.sh); an existing install of the same version is kept, not rebuilt.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.tools/llamacpp"
version=0.3.36
spec="llama-cpp-python==$version"
imports="llama_cpp, numpy, matplotlib"
if [ "${1:-}" = "--server" ]; then
  spec="llama-cpp-python[server]==$version"
  imports="$imports, llama_cpp.server.app"
elif [ -n "${1:-}" ]; then
  echo "usage: scripts/install-llamacpp.sh [--server]" >&2
  exit 2
fi
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import $imports" 2>/dev/null; then
  echo "installing $spec into $venv (builds llama.cpp from source unless it is there)" >&2
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$spec" numpy matplotlib >&2
fi
"$venv/bin/python" -c "import llama_cpp; assert llama_cpp.__version__ == '$version', llama_cpp.__version__" || {
  echo "$venv holds llama-cpp-python $("$venv/bin/python" -c 'import llama_cpp; print(llama_cpp.__version__)'), not $version; remove it and rerun" >&2
  exit 1
}
echo "$venv/bin/python"
