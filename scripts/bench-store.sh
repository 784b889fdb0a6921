#!/usr/bin/env bash
# The block store's figures, in one run on this machine (BENCHMARKS.md, "The block store"):
#  1. ape-llama/benches/store.rs: loading a block from disk and from Redis against encoding it,
#     for blocks of 64 to 2048 tokens of the default model;
#  2. time to first token of `ape run` over 8 passages of about 440 tokens: a first run (empty
#     store, every passage encoded) against a second run (a new process, every passage on disk),
#     and against a run in a new process with an empty disk tier that reads them from Redis.
#     Rounds alternate, each with a fresh store; medians and their ratios are printed.
# A redis-server of its own runs on a free loopback port and is stopped at the end.
# Usage: scripts/bench-store.sh [ROUNDS]   (default 5; APE_BENCH_SIZES narrows step 1)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
command -v redis-server >/dev/null || { echo "redis-server is needed (apt-get install redis-server)" >&2; exit 1; }
bash scripts/fetch-model.sh >/dev/null
work=$(mktemp -d)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no >"$work/redis.log" 2>&1 &
redis_pid=$!
trap 'kill $redis_pid 2>/dev/null; rm -rf "$work"' EXIT
url="redis://127.0.0.1:$port/0"
until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.1; done

echo "== $(date -u +%F) on $(nproc) cores; redis-server $(redis-server --version | grep -oE 'v=[0-9.]+')"
echo "== 1. load against encode, per block size"
APE_BENCH_REDIS=$url APE_BENCH_ROUNDS=$rounds cargo bench --quiet -p ape-llama --bench store

echo
echo "== 2. time to first token of ape run: first run against a second process"
cargo build --release --quiet --bin ape
python3 - "$work" <<'EOF'
import sys
work = sys.argv[1]
towns = ["Esterhill", "Marrow Bay", "Vel Crossing", "Oakmere", "Dunlow", "Harrowgate", "Sable Point", "Fenwick"]
for i, town in enumerate(towns):
    s = []
    for j in range(9):
        s.append(f"In {1900 + 7 * i + j} the council of {town} recorded that its bakery sold {120 + 13 * j + i} loaves of rye, "
                 f"{40 + 3 * j} of barley and {j + i} cakes for the autumn fair, and the river rose {j % 4 + 1} feet.")
    open(f"{work}/passage{i}.txt", "w").write(" ".join(s) + "\n")
EOF
args=(run --question "How many loaves of rye did the bakery of Oakmere sell in 1924?" --max-tokens 8 --device cpu)
for i in 0 1 2 3 4 5 6 7; do args+=(--context "$work/passage$i.txt"); done
ttft() { grep -oE 'TTFT [0-9.]+ ms' "$1" | grep -oE '[0-9.]+'; }
: >"$work/first"; : >"$work/second"; : >"$work/redis"
for r in $(seq "$rounds"); do
  rm -rf "$work/store" "$work/store2"
  redis-cli -p "$port" flushall >/dev/null
  target/release/ape "${args[@]}" --store "$work/store" --redis "$url" >/dev/null 2>"$work/log1"
  target/release/ape "${args[@]}" --store "$work/store" --redis "$url" >/dev/null 2>"$work/log2"
  target/release/ape "${args[@]}" --store "$work/store2" --redis "$url" >/dev/null 2>"$work/log3"
  ttft "$work/log1" >>"$work/first"; ttft "$work/log2" >>"$work/second"; ttft "$work/log3" >>"$work/redis"
  echo "round $r: first $(ttft "$work/log1") ms ($(grep -oE '[0-9]+ tokens encoded' "$work/log1")), second $(ttft "$work/log2") ms ($(grep -oE '^blocks \([^)]*\)' "$work/log2")), empty disk + redis $(ttft "$work/log3") ms ($(grep -oE '^blocks \([^)]*\)' "$work/log3"))"
done
python3 - "$work" <<'EOF'
import statistics, sys
w = sys.argv[1]
m = {k: statistics.median(float(x) for x in open(f"{w}/{k}")) for k in ("first", "second", "redis")}
print()
print("| run | TTFT ms (median) | first / this |")
print("|---|---:|---:|")
print(f"| first (empty store, 8 passages encoded) | {m['first']:.0f} | 1.0x |")
print(f"| second process, passages from disk | {m['second']:.0f} | {m['first'] / m['second']:.1f}x |")
print(f"| new process, empty disk, passages from Redis | {m['redis']:.0f} | {m['first'] / m['redis']:.1f}x |")
EOF
