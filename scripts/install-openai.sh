#!/usr/bin/env bash
# Installs the official `openai` Python client (pinned) from PyPI into .tools/openai (git-ignored)
# and prints its python on the last line. Does nothing when it is already there. The test command
# runs scripts/serve_openai_client.py with it against `ape serve`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.tools/openai"
pin="openai==3.51.0"
stamp="$venv/.installed-${pin//[^A-Za-z0-9.]/_}"
if [ ! -f "$stamp" ]; then
  echo "installing $pin into $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$pin" >&2
  touch "$stamp"
fi
echo "$venv/bin/python"
