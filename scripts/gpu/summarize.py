"""Turns one GPU session's results (criterion JSON, peer.json, test logs) into markdown tables
with our figures next to the peer's from the same run. Usage: summarize.py OUT_DIR"""
import json
import os
import re
import sys

out = sys.argv[1]
ours = {}
for root, _, files in os.walk(os.path.join(out, "criterion")):
    if "estimates.json" in files and root.endswith("new"):
        with open(os.path.join(root, "benchmark.json")) as f:
            bench = json.load(f)
        with open(os.path.join(root, "estimates.json")) as f:
            est = json.load(f)
        ns = est["mean"]["point_estimate"]
        tp = bench.get("throughput") or {}
        entry = {"ms": ns / 1e6}
        if "Elements" in tp:
            entry["tflops"] = tp["Elements"] / ns / 1e3
        if "Bytes" in tp:
            entry["gbps"] = tp["Bytes"] / ns
        ours[bench["full_id"]] = entry
peer = json.load(open(os.path.join(out, "peer.json")))
pc = peer["cases"]
fmt = lambda x, spec: "n/a" if x is None else format(x, spec)

print(f"Device: {peer['device']}; torch {peer['torch']}\n")
print("### Prefill (bf16, d 128, 32 heads / 8 KV heads, non-causal over cached keys), TFLOP/s\n")
print("| shape | ours plain | ours APE | SDPA flash | SDPA cuDNN | ours plain / flash |")
print("|---|---|---|---|---|---|")
for sh in ["q1024_k8192", "q1024_k32768", "q4096_k32768", "q8192_k65536"]:
    a = ours.get(f"prefill/plain/{sh}", {}).get("tflops")
    b = ours.get(f"prefill/ape/{sh}", {}).get("tflops")
    f = pc.get(f"prefill/{sh}/flash", {}).get("tflops")
    c = pc.get(f"prefill/{sh}/cudnn", {}).get("tflops")
    ratio = a / f if a and f else None
    print(f"| {sh} | {fmt(a, '.1f')} | {fmt(b, '.1f')} | {fmt(f, '.1f')} | {fmt(c, '.1f')} | {fmt(ratio, '.2f')} |")

copy = ours.get("memory_bound/copy_d2d_1GiB", {}).get("gbps")
tcopy = pc.get("copy_d2d_1GiB/torch", {}).get("gbps")
print(f"\nDevice-to-device copy: ours {fmt(copy, '.0f')} GB/s, torch {fmt(tcopy, '.0f')} GB/s\n")
print("### Short question (64 rows) and decode (1 row), K+V read bandwidth, GB/s (APE, T=S=0.9)\n")
print("| rows | keys | segments | ours | ours / copy | SDPA flash (1 segment) |")
print("|---|---|---|---|---|---|")
for k in ours:
    m = re.match(r"short_question_and_decode/rows(\d+)/k(\d+)_s(\d+)", k)
    if m:
        rows, keys, segs = m.groups()
        g = ours[k]["gbps"]
        f = pc.get(f"short_question_and_decode/rows{rows}/k{keys}/flash", {}).get("gbps")
        print(f"| {rows} | {keys} | {segs} | {g:.0f} | {fmt(g / copy if copy else None, '.2f')} | {fmt(f, '.0f')} |")
print("\n### Memory-bound kernels, GB/s\n")
for k in ["memory_bound/merge_states_8x4096x32x128_bf16", "memory_bound/rope_shift_32768x8x128_bf16"]:
    g = ours.get(k, {}).get("gbps")
    print(f"- {k.split('/')[1]}: {fmt(g, '.0f')} GB/s ({fmt(g / copy if g and copy else None, '.2f')} of copy)")

print("\n### Accuracy vs an f64 reference on identical bf16 inputs (relative L2)\n")
print("| case | ours | SDPA flash | SDPA cuDNN |")
print("|---|---|---|---|")
ourerr = {}
log = os.path.join(out, "test_gpu_segmented_attention.log")
if os.path.exists(log):
    for line in open(log):
        m = re.match(r"SDPA-CASE (\S+) rel_l2=(\S+)", line)
        if m:
            ourerr[m.group(1)] = float(m.group(2))
acc = peer.get("accuracy_rel_l2", {})
for name in ["ctx_256x4096", "causal_1024", "decode_1x8192"]:
    f, c = acc.get(f"{name}/flash"), acc.get(f"{name}/cudnn")
    show = lambda x: fmt(x, ".2e") if isinstance(x, float) else str(x)
    print(f"| {name} | {show(ourerr.get(name))} | {show(f)} | {show(c)} |")

e2e = os.path.join(out, "e2e.jsonl")
if os.path.exists(e2e):
    rows = [json.loads(l) for l in open(e2e) if l.startswith("{")]
    ttft = {(r["mode"], r["context"]): r["ttft_ms"] for r in rows if r["bench"] == "ttft"}
    contexts = sorted({c for _, c in ttft})
    print("\n### Time to first token, 64-token question, synthetic Llama-3-8B (ms)\n")
    print("| context | sequential | APE | Block-Attention | sequential / APE |")
    print("|---|---|---|---|---|")
    for c in contexts:
        s_, a_, b_ = (ttft.get((m, c)) for m in ("sequential", "ape", "block-attention"))
        print(f"| {c} | {fmt(s_, '.1f')} | {fmt(a_, '.1f')} | {fmt(b_, '.1f')} | {fmt(s_ / a_ if s_ and a_ else None, '.1f')} |")
    for r in rows:
        if r["bench"] == "end_to_end_256":
            print(f"- prefill + {r['generated']} tokens at {r['context']}, {r['mode']}: {r['total_ms']:.0f} ms (TTFT {r['ttft_ms']:.1f} ms)")
