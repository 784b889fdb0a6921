"""Turns one GPU session's results into markdown tables (stdout) and up to three PNG plots
(written into OUT_DIR), with our figures next to the peer's from the same run and next to the
floor: the time the work would take at the copy bandwidth and GEMM rate measured in that run.
Usage: summarize.py OUT_DIR

Inputs, each optional (what is missing shows as n/a): criterion/ (benches/kernels.rs),
peer.json (scripts/gpu/peer.py), e2e.jsonl (ape-llama/benches/e2e.rs), test_*.log and device.txt
(scripts/gpu/session.sh). The tables never depend on matplotlib; the plots are skipped without it.
"""
import json
import os
import re
import sys

# ---------------------------------------------------------------------------------------------
# Shapes of the benchmarks, as benches/kernels.rs and ape-llama/benches/e2e.rs build them.

PREFILL_SHAPES = ["q1024_k8192", "q1024_k32768", "q4096_k32768", "q8192_k65536"]
# (rows, keys, segments) of short_question_and_decode, in the order kernels.rs runs them.
SHORT_CASES = [(rows, keys, segs) for keys in (32768, 131072) for segs in (16, 256)
               for rows in (64, 1)]
MEMORY_BOUND = ["memory_bound/merge_states_8x4096x32x128_bf16",
                "memory_bound/rope_shift_32768x8x128_bf16"]
SHIFT_SHAPE = "rows64_k32768_s16"  # block_attention_shift/{fused,separate,unshifted}/<shape>
SHIFT_VARIANTS = ("fused", "separate", "unshifted")
# kernels.rs problem(): AttentionDims::new(32, 8, 128)
KERNEL_HEADS, KERNEL_KV_HEADS, KERNEL_HEAD_DIM = 32, 8, 128
BF16_BYTES = 2

# ape-llama/benches/e2e.rs llama3_8b(): Llama-3-8B shapes with synthetic bf16 weights.
LLAMA3_8B = {"layers": 32, "dim": 4096, "heads": 32, "kv_heads": 8, "head_dim": 128,
             "ffn": 14336, "vocab": 128256}
E2E_PREFIX = 32    # e2e.rs: every prompt starts with a 32-token prefix, cached like a context
E2E_QUESTION = 64  # e2e.rs QUESTION; the "question" field of e2e.jsonl overrides it
E2E_CONTEXTS = 16  # e2e.rs CONTEXTS: the context total is split into 16 cached contexts
E2E_MODES = [("sequential", "sequential"), ("ape", "APE"), ("block-attention", "Block-Attention")]

# The bars of BENCHMARKS.md: short question and decode at 60% of the copy.
BANDWIDTH_BAR = 0.6


# ---------------------------------------------------------------------------------------------
# Floors. Every formula of the floor analysis (docs/DESIGN.md §6: count the floor first) lives here.
#
# Rates come from the same run: the device-to-device copy (criterion, else peer.py) and a dense
# bf16 GEMM (peer.py). Convention for bytes: the copy rate counts bytes read plus bytes written
# (kernels.rs and peer.py both count 2 x 1 GiB for a 1 GiB copy), and a memory floor is
# (bytes read + bytes written) / copy rate, whatever the mix of reads and writes. That is the
# conservative choice for work that mostly reads (decode): a pure read stream can run a little
# faster than a copy, so measured / floor may dip slightly under 1 there without being an error.
# A floor is the larger of its memory and compute terms (the two overlap at best).

def memory_floor_ms(nbytes, copy_gbps):
    """Milliseconds to move `nbytes` (read + written) at the copy rate in GB/s (1e9 B/s)."""
    if nbytes is None or not copy_gbps:
        return None
    return nbytes / copy_gbps / 1e6


def compute_floor_ms(flops, gemm_tflops):
    """Milliseconds to do `flops` at the dense bf16 GEMM rate in TFLOP/s."""
    if flops is None or not gemm_tflops:
        return None
    return flops / gemm_tflops / 1e9


def kv_bytes(keys, kv_heads=KERNEL_KV_HEADS, head_dim=KERNEL_HEAD_DIM):
    """Bytes of bf16 K and V for `keys` cached keys: what one attention pass must read."""
    return 2 * keys * kv_heads * head_dim * BF16_BYTES


def llama_layer_matmul_params(m):
    """Weights of one layer's matrix products: Q and O (dim x heads*hd), K and V
    (dim x kv_heads*hd), and the FFN's gate, up and down (dim x ffn each)."""
    attn = 2 * m["dim"] * m["heads"] * m["head_dim"] + 2 * m["dim"] * m["kv_heads"] * m["head_dim"]
    return attn + 3 * m["dim"] * m["ffn"]


def llama_weight_bytes_read(m, tokens):
    """Weight bytes one forward pass over `tokens` tokens must read: every layer's matrices and
    its two norms, the final norm and the output matrix (vocab x dim), and only the embedding
    rows of the tokens run (a gather, not the whole 1 GB table; whether the output is tied to
    the embedding, as in the synthetic model, does not change this count)."""
    layers = m["layers"] * (llama_layer_matmul_params(m) + 2 * m["dim"])
    return (layers + m["dim"] + m["vocab"] * m["dim"] + tokens * m["dim"]) * BF16_BYTES


def llama_kv_bytes_per_token(m):
    """K and V of one token across all layers, bf16 (128 KiB at Llama-3-8B)."""
    return m["layers"] * kv_bytes(1, m["kv_heads"], m["head_dim"])


def llama_matmul_flops(m, tokens):
    """2 FLOPs per weight per token for the layers' matrix products, plus the output matrix once:
    time to first token needs only the last position's logits (the engine asks for LogitRows::Last)."""
    return 2 * m["layers"] * llama_layer_matmul_params(m) * tokens + 2 * m["vocab"] * m["dim"]


def ttft_floor_cached(m, cached, q, copy_gbps, gemm_tflops):
    """Floor of a cached-context mode (APE, Block-Attention): a `q`-token question over `cached`
    cached tokens. Memory: the weights, every cached K and V read once, the question's K and V
    written once (activations are left out: a lower bound). Compute: the matrix products for q
    tokens, non-causal attention of q rows over the cache (QK^T and PV: 4 * q * N * d per head)
    and causal attention among the q tokens (half of 4 * q^2 * d). Block-Attention gets the same
    floor: the attention kernel reads the cached keys through the RoPE shift, with no copy
    (block_attention_shift/fused).
    Returns (memory_ms, compute_ms)."""
    per_layer = m["heads"] * m["head_dim"] * m["layers"]
    nbytes = (llama_weight_bytes_read(m, q)
              + cached * llama_kv_bytes_per_token(m) + q * llama_kv_bytes_per_token(m))
    flops = (llama_matmul_flops(m, q)
             + 4 * q * cached * per_layer
             + 2 * q * q * per_layer)
    return memory_floor_ms(nbytes, copy_gbps), compute_floor_ms(flops, gemm_tflops)


def ttft_floor_sequential(m, tokens, copy_gbps, gemm_tflops):
    """Floor of a sequential prefill of `tokens` tokens (prefix, contexts and question).
    Memory: the weights, and every token's K and V written once. Compute: the matrix products
    for every token and causal attention, 2 * L^2 * d per head (half of the 4 * L^2 * d of full
    attention). Returns (memory_ms, compute_ms)."""
    per_layer = m["heads"] * m["head_dim"] * m["layers"]
    nbytes = llama_weight_bytes_read(m, tokens) + tokens * llama_kv_bytes_per_token(m)
    flops = llama_matmul_flops(m, tokens) + 2 * tokens * tokens * per_layer
    return memory_floor_ms(nbytes, copy_gbps), compute_floor_ms(flops, gemm_tflops)


def floor_of(memory_ms, compute_ms):
    """The larger term, and which one it is; n/a unless both rates were measured."""
    if memory_ms is None or compute_ms is None:
        return None, "n/a"
    return (memory_ms, "memory") if memory_ms >= compute_ms else (compute_ms, "compute")


# ---------------------------------------------------------------------------------------------
# Inputs. Each loader returns something empty when its file is missing or unreadable.

def warn(msg):
    print(f"summarize.py: {msg}", file=sys.stderr)


def load_criterion(out):
    """full_id -> {"ms", and from the throughput: "flops" + "tflops" or "bytes" + "gbps"}."""
    ours = {}
    for root, _, files in os.walk(os.path.join(out, "criterion")):
        if not (root.endswith("new") and "estimates.json" in files and "benchmark.json" in files):
            continue
        try:
            with open(os.path.join(root, "benchmark.json")) as f:
                bench = json.load(f)
            with open(os.path.join(root, "estimates.json")) as f:
                # The median, as the peer reports (scripts/gpu/peer.py).
                ns = json.load(f)["median"]["point_estimate"]
            tp = bench.get("throughput") or {}
            entry = {"ms": ns / 1e6}
            if "Elements" in tp:  # kernels.rs reports FLOPs as elements
                entry["flops"] = tp["Elements"]
                entry["tflops"] = tp["Elements"] / ns / 1e3
            nbytes = tp.get("Bytes", tp.get("BytesDecimal"))
            if nbytes is not None:
                entry["bytes"] = nbytes
                entry["gbps"] = nbytes / ns
            ours[bench["full_id"]] = entry
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as e:
            warn(f"skipped {root}: {e!r}")
    return ours


def load_peer(out):
    path = os.path.join(out, "peer.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            peer = json.load(f)
        return peer if isinstance(peer, dict) else {}
    except (OSError, ValueError) as e:
        warn(f"peer.json unreadable: {e!r}")
        return {}


def load_e2e(out):
    """The JSON lines of e2e.jsonl; a line cut short by a timeout is skipped."""
    rows = []
    path = os.path.join(out, "e2e.jsonl")
    if os.path.exists(path):
        for line in open(path):
            if line.startswith("{"):
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    warn(f"e2e.jsonl: skipped a line that is not JSON: {line[:80]!r}")
    return rows


def load_device_txt(out):
    """date and the nvidia-smi line (name, driver, memory, max SM clock) of device.txt, or None
    when the file is absent."""
    path = os.path.join(out, "device.txt")
    if not os.path.exists(path):
        return None
    info = {}
    for line in open(path, errors="replace"):
        line = line.strip()
        if line.startswith("date:"):
            info["date"] = line.split(":", 1)[1].strip()
            continue
        # session.sh: nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm
        parts = [p.strip() for p in line.split(",")]
        if "driver" not in info and len(parts) == 4 and re.fullmatch(r"\d+(\.\d+)+", parts[1]):
            info.update(name=parts[0], driver=parts[1], memory=parts[2], clock=parts[3])
    return info


def load_test_errors(out):
    """SDPA-CASE lines of the segmented attention test: case -> relative L2 error."""
    errs = {}
    path = os.path.join(out, "test_gpu_segmented_attention.log")
    if os.path.exists(path):
        for line in open(path, errors="replace"):
            m = re.match(r"SDPA-CASE (\S+) rel_l2=(\S+)", line)
            if m:
                try:
                    errs[m.group(1)] = float(m.group(2))
                except ValueError:
                    pass
    return errs


# ---------------------------------------------------------------------------------------------
# Formatting.

def fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def ratio(a, b):
    return a / b if a is not None and b else None


def table(header, rows):
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")


def short_id(rows, keys, segs):
    return f"short_question_and_decode/rows{rows}/k{keys}_s{segs}"


def shift_shapes(ours):
    """The shift shape the brief names, plus any other shape kernels.rs may add."""
    found = {k.split("/")[2] for k in ours
             if k.startswith("block_attention_shift/") and k.count("/") == 2}
    return [SHIFT_SHAPE] + sorted(found - {SHIFT_SHAPE})


def shift_rows_keys(shape):
    """(question rows, cached keys) of a block_attention_shift shape, or (None, None)."""
    m = re.match(r"rows(\d+)_k(\d+)", shape)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


# ---------------------------------------------------------------------------------------------
# Plots: at most three PNG files (the device tool returns few files per call).

def prefill_shapes(ours, pc):
    """The prefill shapes this run measured (ours or the peer's), by rows then keys; the full
    set's when it measured none (its table then says n/a)."""
    found = {m.group(1) for k in list(ours) + list(pc)
             for m in [re.match(r"prefill/(?:plain/|ape/)?(q\d+_k\d+)(?:/\w+)?$", k)] if m}
    if not found:
        return PREFILL_SHAPES
    return sorted(found, key=lambda sh: tuple(int(x[1:]) for x in sh.split("_")))


def copy_entry(entries, pattern):
    """The device copy's entry: the largest the run made (1 GiB; the quick phase's dry run
    copies less), or {}."""
    found = []
    for k, e in entries.items():
        m = re.match(pattern, k)
        if m:
            n, unit = int(m.group(1)), m.group(2)
            found.append((n << {"GiB": 30, "MiB": 20, "B": 0}[unit], e))
    return max(found, key=lambda x: x[0])[1] if found else {}


def make_plots(out, d):
    """Writes plot_ttft.png, plot_prefill.png, plot_bandwidth.png where their inputs exist.
    Returns the set of files written. Never raises: a plot that fails is reported and skipped."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except Exception as e:  # ImportError, or a broken install
        warn(f"plots skipped: matplotlib not importable ({e.__class__.__name__}: {e})")
        return set()
    written = set()
    for name, fn in [("plot_ttft.png", plot_ttft), ("plot_prefill.png", plot_prefill),
                     ("plot_bandwidth.png", plot_bandwidth)]:
        try:
            fig = fn(plt, FuncFormatter, d)
            if fig is None:
                continue
            fig.savefig(os.path.join(out, name), dpi=120, bbox_inches="tight")
            plt.close(fig)
            written.add(name)
        except Exception as e:
            warn(f"{name} skipped: {e.__class__.__name__}: {e}")
            plt.close("all")
    return written


def outside_legend(ax):
    """Legend right of the axes, where it cannot hide a bar or a line."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=9)


def k_tokens(x, _pos=None):
    return f"{x / 1024:g}K" if x >= 1024 else f"{x:g}"


def plot_ttft(plt, FuncFormatter, d):
    ttft = d["ttft"]
    if not ttft:
        return None
    contexts = sorted({c for _, c in ttft})
    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"sequential": ("C0", "o"), "ape": ("C1", "s"), "block-attention": ("C2", "^")}
    for mode, label in E2E_MODES:
        pts = [(c, ttft[(mode, c)]) for c in contexts if (mode, c) in ttft]
        if pts:
            color, marker = styles[mode]
            ax.plot(*zip(*pts), marker=marker, color=color, label=label)
    # Floors as dashed lines: one for sequential, one shared by the two cached modes.
    for mode, label, color in [("sequential", "floor, sequential", "C0"),
                               ("ape", "floor, cached contexts", "C1")]:
        pts = [(c, d["ttft_floor"][(mode, c)][0]) for c in contexts
               if d["ttft_floor"].get((mode, c), (None,))[0] is not None]
        if pts:
            ax.plot(*zip(*pts), linestyle="--", color=color, alpha=0.6, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(contexts)
    ax.xaxis.set_major_formatter(FuncFormatter(k_tokens))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda *_: ""))
    ax.set_xlabel(f"context (tokens in {E2E_CONTEXTS} contexts; question {d['question']} tokens)")
    ax.set_ylabel("time to first token (ms, log)")
    ax.set_title(f"Time to first token, Llama-3-8B shapes (synthetic)\n{d['device']}")
    ax.grid(True, which="both", alpha=0.3)
    outside_legend(ax)
    return fig


def grouped_bars(ax, groups, series, width):
    """Bars of several series side by side per group; a missing value is an 'n/a' label."""
    n = len(series)
    for i, (label, values) in enumerate(series):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, [v or 0 for v in values], width, label=label, color=f"C{i}")
        ax.bar_label(bars, labels=[fmt(v, ".0f") for v in values], fontsize=7, padding=2)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)


def plot_prefill(plt, FuncFormatter, d):
    shapes = d["prefill_shapes"]
    series = [("ours plain", [d["ours"].get(f"prefill/plain/{s}", {}).get("tflops")
                              for s in shapes]),
              ("ours APE", [d["ours"].get(f"prefill/ape/{s}", {}).get("tflops")
                            for s in shapes]),
              ("SDPA flash", [d["pc"].get(f"prefill/{s}/flash", {}).get("tflops")
                              for s in shapes]),
              ("SDPA cuDNN", [d["pc"].get(f"prefill/{s}/cudnn", {}).get("tflops")
                              for s in shapes])]
    if all(v is None for _, vs in series for v in vs):
        return None
    fig, ax = plt.subplots(figsize=(9, 5))
    grouped_bars(ax, [s.replace("_", " ") for s in shapes], series, 0.2)
    if d["gemm"]:
        ax.axhline(d["gemm"], color="k", linestyle="--",
                   label=f"dense bf16 GEMM\n{d['gemm']:.0f} TFLOP/s (floor rate)")
    ax.set_xlabel("question rows x cached keys (32 heads / 8 KV heads, d 128, bf16)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(f"Prefill attention throughput\n{d['device']}")
    ax.grid(True, axis="y", alpha=0.3)
    outside_legend(ax)
    return fig


def plot_bandwidth(plt, FuncFormatter, d):
    groups = [(keys, segs) for keys in (32768, 131072) for segs in (16, 256)]
    series = [(f"{'decode, 1 row' if rows == 1 else f'{rows}-row question'}",
               [d["ours"].get(short_id(rows, k, s), {}).get("gbps") for k, s in groups])
              for rows in (64, 1)]
    if all(v is None for _, vs in series for v in vs):
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    grouped_bars(ax, [f"{k_tokens(k)} keys\n{s} segments" for k, s in groups], series, 0.35)
    if d["copy"]:
        ax.axhline(d["copy"], color="k", linestyle="--",
                   label=f"device-to-device copy\n{d['copy']:.0f} GB/s (floor rate)")
        ax.axhline(BANDWIDTH_BAR * d["copy"], color="gray", linestyle=":",
                   label=f"{BANDWIDTH_BAR:.0%} of copy (the bar)")
    ax.set_xlabel("cached keys and segments (bf16, 8 KV heads, d 128)")
    ax.set_ylabel("K+V read bandwidth (GB/s)")
    ax.set_title(f"Short question and decode over cached blocks (APE)\n{d['device']}")
    ax.grid(True, axis="y", alpha=0.3)
    outside_legend(ax)
    return fig


# ---------------------------------------------------------------------------------------------

def main():
    # --quick: the session's quick phase; its tables list what it measured, without the rest.
    quick = sys.argv[1:2] == ["--quick"]
    args = sys.argv[2:] if quick else sys.argv[1:]
    if len(args) != 1:
        sys.exit("usage: summarize.py [--quick] OUT_DIR")
    out = args[0]
    ours = load_criterion(out)
    peer = load_peer(out)
    pc = peer.get("cases") or {}
    dev_txt = load_device_txt(out)
    e2e = load_e2e(out)

    # The two ceilings of this run, for every floor below.
    copy = copy_entry(ours, r"memory_bound/copy_d2d_(\d+)(GiB|MiB|B)$").get("gbps")
    tcopy = copy_entry(pc, r"copy_d2d_(\d+)(GiB|MiB|B)/torch$").get("gbps")
    shapes = prefill_shapes(ours, pc)
    if copy:
        floor_copy, copy_src = copy, "criterion"
    else:
        floor_copy, copy_src = tcopy, "peer.py" if tcopy else "n/a"
    gemm = peer.get("gemm_bf16_tflops")

    device = (peer.get("device") or (dev_txt or {}).get("name")
              or next((r["device"] for r in e2e if r.get("device")), None) or "n/a")
    ttft = {(r["mode"], r["context"]): r["ttft_ms"] for r in e2e
            if r.get("bench") == "ttft" and {"mode", "context", "ttft_ms"} <= r.keys()}
    question = next((r["question"] for r in e2e if r.get("bench") == "ttft" and "question" in r),
                    E2E_QUESTION)
    ttft_floor = {}
    for mode, _ in E2E_MODES:
        for c in sorted({c for _, c in ttft}):
            cached = E2E_PREFIX + c
            if mode == "sequential":
                ttft_floor[(mode, c)] = ttft_floor_sequential(LLAMA3_8B, cached + question,
                                                              floor_copy, gemm)
            else:
                ttft_floor[(mode, c)] = ttft_floor_cached(LLAMA3_8B, cached, question,
                                                          floor_copy, gemm)
    ttft_floor = {k: floor_of(*v) + v for k, v in ttft_floor.items()}  # (floor, bound, mem, comp)

    plots = make_plots(out, {"ours": ours, "pc": pc, "prefill_shapes": shapes, "ttft": ttft, "ttft_floor": ttft_floor,
                             "copy": copy or tcopy, "gemm": gemm, "device": device,
                             "question": question})

    def link(name, alt):
        if name in plots:
            print(f"\n![{alt}]({name})")

    print(f"Device: {device}; torch {peer.get('torch', 'n/a')}\n")
    if dev_txt is not None:
        print(f"Date: {dev_txt.get('date', 'n/a')}; driver {dev_txt.get('driver', 'n/a')}; "
              f"memory {dev_txt.get('memory', 'n/a')}; max SM clock {dev_txt.get('clock', 'n/a')}\n")
    print(f"Floors from this run: copy {fmt(floor_copy, '.0f')} GB/s ({copy_src}, read + write), "
          f"dense bf16 GEMM {fmt(gemm, '.0f')} TFLOP/s (peer.py)\n")

    print("### Prefill (bf16, d 128, 32 heads / 8 KV heads, non-causal over cached keys), TFLOP/s\n")
    rows = []
    for sh in shapes:
        a = ours.get(f"prefill/plain/{sh}", {}).get("tflops")
        b = ours.get(f"prefill/ape/{sh}", {}).get("tflops")
        f = pc.get(f"prefill/{sh}/flash", {}).get("tflops")
        c = pc.get(f"prefill/{sh}/cudnn", {}).get("tflops")
        rows.append([sh, fmt(a, ".1f"), fmt(b, ".1f"), fmt(f, ".1f"), fmt(c, ".1f"),
                     fmt(ratio(a, f), ".2f")])
    table(["shape", "ours plain", "ours APE", "SDPA flash", "SDPA cuDNN", "ours plain / flash"], rows)
    link("plot_prefill.png", "prefill TFLOP/s")

    tiles = {}
    for k, e in ours.items():
        m = re.match(r"tile_shapes/([^/]+)/(prefill|wide|decode)$", k)
        if m:
            tiles.setdefault(m.group(1), {})[m.group(2)] = e.get("tflops") or e.get("gbps")
    if tiles:
        print("\n### Tile shapes on the same problems (benches/kernels.rs, bench_tile_shapes)\n")
        print("Prefill over cached keys (plain, 32 heads / 8 KV heads): TFLOP/s; the decode row"
              " (APE, d 128): K+V read GB/s. The launcher runs the wide tile at head dim 64 where"
              " a prefill fills the GPU with 128-row tiles, and the decode tile for at most 16"
              " packed rows per sequence: a ratio under 1 says that choice is wrong there.\n")
        rows = []
        for sh, by in sorted(tiles.items()):
            other = "wide" if "wide" in by else "decode"
            rows.append([sh, fmt(by.get("prefill"), ".1f"), other, fmt(by.get(other), ".1f"),
                         fmt(ratio(by.get(other), by.get("prefill")), ".2f")])
        table(["shape", "prefill tile", "other tile", "other tile's", "other / prefill"], rows)

    print(f"\nDevice-to-device copy: ours {fmt(copy, '.0f')} GB/s, torch {fmt(tcopy, '.0f')} GB/s\n")
    print("### Short question (64 rows) and decode (1 row), K+V read bandwidth, GB/s (APE, T=S=0.9)\n")
    known = [] if quick else [short_id(*c) for c in SHORT_CASES]
    extra = sorted(k for k in ours if k.startswith("short_question_and_decode/") and k not in known)
    rows = []
    for k in known + extra:
        m = re.match(r"short_question_and_decode/rows(\d+)/k(\d+)_s(\d+)$", k)
        if not m:
            continue
        r_, keys, segs = m.groups()
        g = ours.get(k, {}).get("gbps")
        f = pc.get(f"short_question_and_decode/rows{r_}/k{keys}/flash", {}).get("gbps")
        rows.append([r_, keys, segs, fmt(g, ".0f"), fmt(ratio(g, floor_copy), ".2f"), fmt(f, ".0f")])
    table(["rows", "keys", "segments", "ours", "ours / copy", "SDPA flash (1 segment)"], rows)
    link("plot_bandwidth.png", "short question and decode bandwidth")

    if not quick:
        print("\n### Split-KV sweep: the plan's choice (auto) against fixed split counts, GB/s\n")
        sweep = {}
        for k, e in ours.items():
            m = re.match(r"split_sweep/(rows\d+_k\d+_s\d+)/(auto|\d+)$", k)
            if m:
                sweep.setdefault(m.group(1), {})[m.group(2)] = e.get("gbps")
        names = sorted({n for by in sweep.values() for n in by if n != "auto"}, key=int)
        rows = [[sh, fmt(by.get("auto"), ".0f")] + [fmt(by.get(n), ".0f") for n in names]
                for sh, by in sorted(sweep.items())]
        table(["shape", "auto"] + [f"{n} splits" for n in names], rows)

    print("\n### Batched decode: one launch for every sequence vs one launch per sequence\n")
    print("One decode row per sequence over its own cached keys (APE, d 128, 32 heads / 8 KV"
          " heads); K+V read bandwidth of all sequences, GB/s (benches/kernels.rs,"
          " bench_batch_decode). `capturable`: a CapturableBatch, prepare + launch per step;"
          " `graph`: prepare + the replay of a CUDA graph that captured its launch.\n")
    batch = {}
    for k, e in ours.items():
        m = re.match(r"batch_decode/(batched|per_sequence|capturable|graph)/(n\d+_k\d+_s\d+)$", k)
        if m:
            batch.setdefault(m.group(2), {})[m.group(1)] = e.get("gbps")
    rows = []
    for sh, by in sorted(batch.items()):
        b, p = by.get("batched"), by.get("per_sequence")
        c, g = by.get("capturable"), by.get("graph")
        # peer.py's batched SDPA over the same sequences (its id has no segment count).
        f = pc.get(f"batch_decode/{sh.rsplit('_', 1)[0]}/flash", {}).get("gbps")
        rows.append([sh, fmt(b, ".0f"), fmt(p, ".0f"), fmt(c, ".0f"), fmt(g, ".0f"),
                     fmt(f, ".0f"), fmt(ratio(b, p), ".2f"), fmt(ratio(g, b), ".2f"),
                     fmt(ratio(b, f), ".2f"), fmt(ratio(b, floor_copy), ".2f")])
    table(["shape", "batched", "per sequence", "capturable", "graph", "SDPA flash",
           "batched / per sequence", "graph / batched", "batched / flash", "batched / copy"],
          rows)

    if not quick:
        print("\n### Host syncs: a 64 MiB copy then one small call, per iteration\n")
        print("If a call makes the host wait for the stream, its launch time adds to each iteration;"
              " if not, the iteration costs about the copy alone (benches/kernels.rs,"
              " bench_host_sync).\n")
        alone = ours.get("host_sync/copy64MiB_then_nothing", {}).get("ms")
        rows = []
        for then in ("nothing", "rms_norm", "attention", "upload"):
            t = ours.get(f"host_sync/copy64MiB_then_{then}", {}).get("ms")
            over = None if t is None or alone is None else (t - alone) * 1e3
            rows.append([then, fmt(None if t is None else t * 1e3, ".1f"), fmt(over, ".1f")])
        table(["then", "us per iteration", "us over the copy alone"], rows)

        print("\n### Memory-bound kernels, GB/s\n")
        for k in MEMORY_BOUND:
            g = ours.get(k, {}).get("gbps")
            print(f"- {k.split('/')[1]}: {fmt(g, '.0f')} GB/s ({fmt(ratio(g, floor_copy), '.2f')} of copy)")

        print("\n### Block-Attention shift: read in place vs a separate RoPE shift kernel\n")
        print("Question rows over 32K keys cached at position 0 in 16 blocks, each read at its offset."
              " `fused`: the attention kernel reads the cached keys through the RoPE shift (it rotates"
              " the query rows instead, split hi + lo); `separate`: the RoPE shift kernel on copies of"
              " every block's K, then plain attention; `unshifted`: the same attention with no shift,"
              " the floor of both.\n")
        rows = []
        for sh in shift_shapes(ours):
            fu, se, un = (ours.get(f"block_attention_shift/{v}/{sh}", {}).get("ms")
                          for v in SHIFT_VARIANTS)
            rows.append([sh, fmt(fu, ".3f"), fmt(se, ".3f"), fmt(un, ".3f"),
                         fmt(ratio(se, fu), ".2f"), fmt(ratio(fu, un), ".2f")])
        table(["shape", "fused ms", "separate ms", "unshifted ms", "separate / fused",
               "fused / unshifted"], rows)

    print("\n### Kernels: measured vs floor\n")
    print("Floor: FLOPs / dense bf16 GEMM rate (prefill), bytes moved / copy rate (the rest),"
          " both measured in this run. The SDPA column is the same ratio for the peer's time.\n")
    rows = []

    def floor_row(case, entry, floor_ms, bound, peer_ms=None):
        ms = entry.get("ms")
        rows.append([case, fmt(ms, ".3f"), fmt(floor_ms, ".3f"), bound,
                     fmt(ratio(ms, floor_ms), ".2f"), fmt(ratio(peer_ms, floor_ms), ".2f")])

    for sh in shapes:
        m = re.match(r"q(\d+)_k(\d+)$", sh)
        # FLOPs from criterion's throughput; from the shape when our case is missing (kernels.rs
        # and peer.py both count 4 * rows * keys * heads * d).
        shape_flops = 4 * int(m.group(1)) * int(m.group(2)) * KERNEL_HEADS * KERNEL_HEAD_DIM
        for label in ("plain", "ape"):
            e = ours.get(f"prefill/{label}/{sh}", {})
            fl = compute_floor_ms(e.get("flops", shape_flops), gemm)
            peer_ms = pc.get(f"prefill/{sh}/flash", {}).get("ms") if label == "plain" else None
            floor_row(f"prefill/{label}/{sh}", e, fl, "compute", peer_ms)
    for k in known + extra:
        m = re.match(r"short_question_and_decode/rows(\d+)/k(\d+)_s(\d+)$", k)
        if not m:
            continue
        e = ours.get(k, {})
        # Bytes from criterion's throughput (K and V read); from the shape when it is missing.
        fl = memory_floor_ms(e.get("bytes", kv_bytes(int(m.group(2)))), floor_copy)
        peer_ms = pc.get(f"short_question_and_decode/rows{m.group(1)}/k{m.group(2)}/flash",
                         {}).get("ms")
        floor_row(k, e, fl, "memory", peer_ms)
    if not quick:
        for k in MEMORY_BOUND:
            e = ours.get(k, {})
            floor_row(k, e, memory_floor_ms(e.get("bytes"), floor_copy), "memory")
        for sh in shift_shapes(ours):
            # Every variant against one floor: K and V read once, or the attention's FLOPs
            # (4 * rows * keys * heads * d), whichever takes longer.
            n_rows, keys = shift_rows_keys(sh)
            mem = memory_floor_ms(kv_bytes(keys), floor_copy) if keys else None
            flops = 4 * n_rows * keys * KERNEL_HEADS * KERNEL_HEAD_DIM if keys else None
            comp = compute_floor_ms(flops, gemm)
            fl, bound = max(((mem, "memory"), (comp, "compute")),
                            key=lambda x: -1.0 if x[0] is None else x[0])
            for variant in SHIFT_VARIANTS:
                k = f"block_attention_shift/{variant}/{sh}"
                floor_row(k, ours.get(k, {}), fl, bound)
    table(["case", "measured ms", "floor ms", "bound", "measured / floor", "SDPA flash / floor"],
          rows)

    if not quick:
        print("\n### Accuracy vs an f64 reference on identical bf16 inputs (relative L2)\n")
        ourerr = load_test_errors(out)
        acc = peer.get("accuracy_rel_l2") or {}
        show = lambda x: fmt(x, ".2e") if isinstance(x, float) else "n/a" if x is None else str(x)
        table(["case", "ours", "SDPA flash", "SDPA cuDNN"],
              [[name, show(ourerr.get(name)), show(acc.get(f"{name}/flash")),
                show(acc.get(f"{name}/cudnn"))]
               for name in ["ctx_256x4096", "causal_1024", "decode_1x8192"]])

        contexts = sorted({c for _, c in ttft})
        print(f"\n### Time to first token, {question}-token question, synthetic Llama-3-8B (ms)\n")
        rows = []
        for c in contexts:
            s_, a_, b_ = (ttft.get((m, c)) for m, _ in E2E_MODES)
            rows.append([str(c), fmt(s_, ".1f"), fmt(a_, ".1f"), fmt(b_, ".1f"),
                         fmt(ratio(s_, a_), ".1f")])
        if not rows:
            rows = [["n/a"] * 5]
        table(["context", "sequential", "APE", "Block-Attention", "sequential / APE"], rows)
        link("plot_ttft.png", "time to first token")

        print("\n### TTFT: measured vs floor (ms)\n")
        print(f"Floor at Llama-3-8B shapes: the larger of bytes / copy rate and FLOPs / GEMM rate"
              f" (formulas in summarize.py). Cached modes read the weights and the {E2E_PREFIX}-token"
              f" prefix + contexts' K and V once; sequential prefills all of it causally."
              f" Block-Attention's floor is APE's: the kernel reads the cached keys through the RoPE"
              f" shift, with no copy.\n")
        rows = []
        for c in contexts:
            for mode, label in E2E_MODES:
                fl, bound, mem, comp = ttft_floor[(mode, c)]
                ms = ttft.get((mode, c))
                rows.append([str(c), label, fmt(ms, ".1f"), fmt(mem, ".1f"), fmt(comp, ".1f"),
                             fmt(fl, ".1f"), fmt(ratio(ms, fl), ".2f"), bound])
        if not rows:
            rows = [["n/a"] * 8]
        table(["context", "mode", "measured", "memory floor", "compute floor", "floor",
               "measured / floor", "bound"], rows)

        print()
        for r in e2e:
            if r.get("bench") == "end_to_end_256":
                try:
                    print(f"- prefill + {r['generated']} tokens at {r['context']}, {r['mode']}: "
                          f"{r['total_ms']:.0f} ms (TTFT {r['ttft_ms']:.1f} ms)")
                except (KeyError, TypeError, ValueError):
                    warn(f"e2e.jsonl: an end_to_end_256 line without its fields: {r}")


if __name__ == "__main__":
    main()
