"""Tests of summarize.py on synthetic session outputs (stdlib only; no GPU, no pytest):
    python3 scripts/gpu/test_summarize.py
Runs summarize.py with this interpreter: with matplotlib importable it checks the three plots,
without it the graceful path (tables, one line on stderr, no plot links). The expected numbers
are computed here from the inputs written here, not read back from summarize.py."""
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "summarize.py")
HAS_MPL = importlib.util.find_spec("matplotlib") is not None
PLOTS = ["plot_ttft.png", "plot_prefill.png", "plot_bandwidth.png"]
DEVICE = "NVIDIA H100 80GB HBM3"

# Synthetic measurements (ns per iteration), near what an H100 could give.
COPY_NS = 716_000  # 2 GiB moved (read + write) -> about 3.0 TB/s
GEMM_TFLOPS = 750.0
PREFILL_NS = {("plain", "q1024_k8192"): 520_000, ("ape", "q1024_k8192"): 560_000,
              ("plain", "q1024_k32768"): 1_900_000, ("ape", "q1024_k32768"): 2_050_000,
              ("plain", "q4096_k32768"): 7_300_000, ("ape", "q4096_k32768"): 7_900_000,
              ("plain", "q8192_k65536"): 29_000_000, ("ape", "q8192_k65536"): 31_000_000}
FLASH_MS = {"q1024_k8192": 0.40, "q1024_k32768": 1.50, "q4096_k32768": 5.9, "q8192_k65536": 23.0}
SHORT_NS = {(64, 32768, 16): 70_000, (1, 32768, 16): 60_000, (64, 32768, 256): 80_000,
            (1, 32768, 256): 75_000, (64, 131072, 16): 250_000, (1, 131072, 16): 230_000,
            (64, 131072, 256): 270_000, (1, 131072, 256): 260_000}
MERGE_NS, ROPE_NS = 130_000, 60_000
SHIFT_FUSED_NS, SHIFT_SEPARATE_NS, SHIFT_UNSHIFTED_NS = 61_000, 152_000, 58_000
SWEEP_NS = {"auto": 40_000, "1": 900_000, "16": 60_000, "132": 38_000}
HOST_SYNC_NS = {"nothing": 40_000, "rms_norm": 41_000, "attention": 52_000, "upload": 50_500}
BATCH_BYTES = 64 * 2 * 4096 * 8 * 128 * 2
BATCH_NS = {"batched": 450_000, "per_sequence": 1_300_000, "capturable": 460_000,
            "graph": 430_000}
TTFT_MS = {("sequential", 4096): 420.0, ("ape", 4096): 21.0, ("block-attention", 4096): 24.0,
           ("sequential", 8192): 900.0, ("ape", 8192): 23.0, ("block-attention", 8192): 28.0,
           ("sequential", 32768): 5200.0, ("ape", 32768): 31.0, ("block-attention", 32768): 45.0}


def prefill_flops(shape):
    rows, keys = (int(x[1:]) for x in shape.split("_"))
    return 4 * rows * keys * 32 * 128


def kv_bytes(keys):
    return keys * 8 * 128 * 2 * 2  # keys x 8 KV heads x d 128, K and V, bf16


MERGE_BYTES = 9 * 4096 * 32 * (128 * 2 + 4)  # 8 states read + 1 written, bf16 V and f32 LSE
ROPE_BYTES = 32768 * 8 * 128 * 2 * 2        # bf16 keys read and written
COPY_BYTES = 2 * (1 << 30)


def write_criterion(out, full_id, ns, throughput=None):
    """One case as criterion 0.5 leaves it: <dir>/new/benchmark.json and estimates.json."""
    d = os.path.join(out, "criterion", *full_id.split("/"), "new")
    os.makedirs(d, exist_ok=True)
    group, _, rest = full_id.partition("/")
    function, _, value = rest.partition("/")
    est = {"confidence_interval": {"confidence_level": 0.95, "lower_bound": ns * 0.99,
                                   "upper_bound": ns * 1.01},
           "point_estimate": ns, "standard_error": ns * 0.004}
    with open(os.path.join(d, "benchmark.json"), "w") as f:
        json.dump({"group_id": group, "function_id": function, "value_str": value or None,
                   "throughput": throughput, "full_id": full_id, "directory_name": full_id,
                   "title": full_id}, f)
    with open(os.path.join(d, "estimates.json"), "w") as f:
        # The mean differs from the median, so a summary that read it would fail the checks.
        mean = dict(est, point_estimate=ns * 1.5)
        json.dump({"mean": mean, "median": est, "median_abs_dev": est, "slope": None,
                   "std_dev": est}, f)


def full_session(out):
    for (label, shape), ns in PREFILL_NS.items():
        write_criterion(out, f"prefill/{label}/{shape}", ns, {"Elements": prefill_flops(shape)})
    for (rows, keys, segs), ns in SHORT_NS.items():
        write_criterion(out, f"short_question_and_decode/rows{rows}/k{keys}_s{segs}", ns,
                        {"Bytes": kv_bytes(keys)})
    write_criterion(out, "memory_bound/merge_states_8x4096x32x128_bf16", MERGE_NS,
                    {"Bytes": MERGE_BYTES})
    write_criterion(out, "memory_bound/rope_shift_32768x8x128_bf16", ROPE_NS, {"Bytes": ROPE_BYTES})
    write_criterion(out, "memory_bound/copy_d2d_1GiB", COPY_NS, {"Bytes": COPY_BYTES})
    # One with a throughput, one without: both must be read.
    for splits, ns in SWEEP_NS.items():
        write_criterion(out, f"split_sweep/rows1_k32768_s16/{splits}", ns,
                        {"Bytes": kv_bytes(32768)})
    for then, ns in HOST_SYNC_NS.items():
        write_criterion(out, f"host_sync/copy64MiB_then_{then}", ns)
    for variant, ns in BATCH_NS.items():
        write_criterion(out, f"batch_decode/{variant}/n64_k4096_s4", ns,
                        {"Bytes": BATCH_BYTES})
    write_criterion(out, "block_attention_shift/fused/rows64_k32768_s16", SHIFT_FUSED_NS,
                    {"Bytes": kv_bytes(32768)})
    write_criterion(out, "block_attention_shift/separate/rows64_k32768_s16", SHIFT_SEPARATE_NS)
    write_criterion(out, "block_attention_shift/unshifted/rows64_k32768_s16", SHIFT_UNSHIFTED_NS)

    cases = {}
    for shape, ms in FLASH_MS.items():
        cases[f"prefill/{shape}/flash"] = {"ms": ms, "how": "enable_gqa",
                                           "tflops": prefill_flops(shape) / (ms * 1e9)}
        cases[f"prefill/{shape}/cudnn"] = {"ms": ms * 0.8, "how": "enable_gqa",
                                           "tflops": prefill_flops(shape) / (ms * 0.8e9)}
    for keys in (32768, 131072):
        for rows in (64, 1):
            ms = kv_bytes(keys) / 2.2e9  # 2.2 TB/s
            cases[f"short_question_and_decode/rows{rows}/k{keys}/flash"] = {
                "ms": ms, "how": "enable_gqa", "gbps": kv_bytes(keys) / (ms * 1e6)}
            cases[f"short_question_and_decode/rows{rows}/k{keys}/cudnn"] = {
                "ms": None, "how": "No available kernel."}
    cases["copy_d2d_1GiB/torch"] = {"ms": 0.72, "gbps": COPY_BYTES / 0.72e6}
    peer = {"device": DEVICE, "torch": "2.5.1+cu124", "cases": cases,
            "gemm_bf16_tflops": GEMM_TFLOPS,
            "accuracy_rel_l2": {"ctx_256x4096/flash": 3.1e-3, "ctx_256x4096/cudnn": 3.3e-3,
                                "causal_1024/flash": 2.9e-3, "causal_1024/cudnn": 3.0e-3,
                                "decode_1x8192/flash": 2.5e-3,
                                "decode_1x8192/cudnn": "No available kernel."}}
    with open(os.path.join(out, "peer.json"), "w") as f:
        json.dump(peer, f, indent=1)

    with open(os.path.join(out, "e2e.jsonl"), "w") as f:
        for (mode, ctx), ms in TTFT_MS.items():
            f.write(json.dumps({"bench": "ttft", "device": DEVICE, "mode": mode, "context": ctx,
                                "question": 64, "ttft_ms": ms}) + "\n")
        f.write(json.dumps({"bench": "end_to_end_256", "device": DEVICE, "mode": "ape",
                            "context": 32768, "total_ms": 2900.0, "ttft_ms": 31.5,
                            "generated": 256}) + "\n")
        f.write('{"bench":"ttft","device":"NVIDIA H100 80GB HBM3","mode":"sequ')  # cut by timeout

    with open(os.path.join(out, "device.txt"), "w") as f:
        f.write("date: 2026-11-02T10:11:12Z\n"
                f"{DEVICE}, 550.54.15, 81559 MiB, 1980 MHz\n"
                "ape-attn 0.1.0, kernels built for sm_90, nvcc 12.6\n"
                "3fa4514d2c6a1e0f00000000000000000000aaaa\n")
    with open(os.path.join(out, "test_gpu_segmented_attention.log"), "w") as f:
        f.write("running 1 test\nSDPA-CASE ctx_256x4096 rel_l2=2.500000e-3\n"
                "SDPA-CASE causal_1024 rel_l2=2.700000e-3\n"
                "SDPA-CASE decode_1x8192 rel_l2=2.000000e-3\ntest result: ok\n")


# ---- Independent floor arithmetic for the end-to-end check (Llama-3-8B, bf16). ----

def llama_floor_ms(tokens_run, cached, copy_bps, gemm_flops):
    """Floor of one forward pass over `tokens_run` new tokens after `cached` cached tokens,
    counted matrix by matrix: max(bytes / copy rate, FLOPs / GEMM rate)."""
    layers, dim, heads, kv, hd, ffn, vocab = 32, 4096, 32, 8, 128, 14336, 128256
    matrices = [(dim, heads * hd), (dim, kv * hd), (dim, kv * hd), (heads * hd, dim),
                (dim, ffn), (dim, ffn), (ffn, dim)]
    layer_weights = sum(a * b for a, b in matrices)
    weight_elems = layers * (layer_weights + 2 * dim) + dim + vocab * dim + tokens_run * dim
    kv_per_token = layers * kv * hd * 2 * 2  # K and V, bf16
    nbytes = weight_elems * 2 + cached * kv_per_token + tokens_run * kv_per_token
    attn = layers * heads * hd * (4 * tokens_run * cached + 2 * tokens_run ** 2)
    flops = 2 * tokens_run * layers * layer_weights + 2 * vocab * dim + attn
    return max(nbytes / copy_bps, flops / gemm_flops) * 1e3


# ---- Reading the markdown back. ----

def section(md, title):
    """The text from the heading that starts with `### title` to the next heading."""
    start = md.index("### " + title)
    end = md.find("\n### ", start + 1)
    return md[start:] if end < 0 else md[start:end]


def rows_of(text):
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("|") and "---" not in line]


def cell(text, key, column):
    """The cell in `column` (a header name) of the row whose leading cells are `key`."""
    rows = rows_of(text)
    col = rows[0].index(column)
    key = key if isinstance(key, tuple) else (key,)
    hits = [r for r in rows[1:] if tuple(r[:len(key)]) == key]
    assert len(hits) == 1, f"row {key} in:\n{text}"
    return hits[0][col]


def assert_num(text, expected, decimals):
    """`text` shows `expected` to `decimals` places (half a unit of the last place, and a
    little for the float arithmetic)."""
    got = float(text)
    tol = 0.5 * 10 ** -decimals + 1e-9 * abs(expected)
    assert abs(got - expected) <= tol, f"shown {text}, expected {expected:.6g}"


def run(out):
    p = subprocess.run([sys.executable, SCRIPT, out], capture_output=True, text=True)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stderr}"
    assert "Traceback" not in p.stderr, p.stderr
    return p.stdout, p.stderr


def check_plots(out, md, err, expected):
    for name in PLOTS:
        path = os.path.join(out, name)
        if HAS_MPL and name in expected:
            with open(path, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
            assert os.path.getsize(path) > 10_000, name
            assert f"]({name})" in md, f"no link to {name}"
        else:
            assert not os.path.exists(path), name
            assert f"]({name})" not in md, f"link to {name}, which was not written"
    if not HAS_MPL:
        assert "plots skipped" in err, err
    assert len([f for f in os.listdir(out) if f.startswith("plot_")]) <= 3


def test_full(keep=None):
    out = keep or tempfile.mkdtemp(prefix="summarize_full_")
    full_session(out)
    md, err = run(out)
    copy_gbps = COPY_BYTES / COPY_NS  # bytes per ns = GB/s
    copy_bps = copy_gbps * 1e9

    assert f"Device: {DEVICE}; torch 2.5.1+cu124" in md
    assert "2026-11-02T10:11:12Z" in md and "driver 550.54.15" in md

    pre = section(md, "Prefill")
    sh = "q1024_k32768"
    ours = prefill_flops(sh) / PREFILL_NS[("plain", sh)] / 1e3
    flash = prefill_flops(sh) / (FLASH_MS[sh] * 1e9)
    assert_num(cell(pre, sh, "ours plain"), ours, 1)
    assert_num(cell(pre, sh, "SDPA flash"), flash, 1)
    assert_num(cell(pre, sh, "ours plain / flash"), ours / flash, 2)

    short = section(md, "Short question")
    g = kv_bytes(131072) / SHORT_NS[(1, 131072, 256)]
    assert_num(cell(short, ("1", "131072", "256"), "ours"), g, 0)
    assert_num(cell(short, ("1", "131072", "256"), "ours / copy"), g / copy_gbps, 2)

    mem = section(md, "Memory-bound")
    assert f"merge_states_8x4096x32x128_bf16: {MERGE_BYTES / MERGE_NS:.0f} GB/s" in mem

    shift = section(md, "Block-Attention shift")
    assert_num(cell(shift, "rows64_k32768_s16", "fused ms"), SHIFT_FUSED_NS / 1e6, 3)
    assert_num(cell(shift, "rows64_k32768_s16", "separate ms"), SHIFT_SEPARATE_NS / 1e6, 3)
    assert_num(cell(shift, "rows64_k32768_s16", "separate / fused"),
               SHIFT_SEPARATE_NS / SHIFT_FUSED_NS, 2)
    assert_num(cell(shift, "rows64_k32768_s16", "fused / unshifted"),
               SHIFT_FUSED_NS / SHIFT_UNSHIFTED_NS, 2)

    sweep = section(md, "Split-KV sweep")
    for splits, ns in SWEEP_NS.items():
        col = "auto" if splits == "auto" else f"{splits} splits"
        assert_num(cell(sweep, "rows1_k32768_s16", col), kv_bytes(32768) / ns, 0)
    # The fixed counts in numeric order, after auto.
    assert sweep.index("| 1 splits") < sweep.index("| 16 splits") < sweep.index("| 132 splits")

    bd = section(md, "Batched decode")
    for variant, col in (("batched", "batched"), ("per_sequence", "per sequence"),
                         ("capturable", "capturable"), ("graph", "graph")):
        assert_num(cell(bd, "n64_k4096_s4", col), BATCH_BYTES / BATCH_NS[variant], 0)
    assert_num(cell(bd, "n64_k4096_s4", "graph / batched"),
               BATCH_NS["batched"] / BATCH_NS["graph"], 2)
    assert_num(cell(bd, "n64_k4096_s4", "batched / per sequence"),
               BATCH_NS["per_sequence"] / BATCH_NS["batched"], 2)
    assert_num(cell(bd, "n64_k4096_s4", "batched / copy"),
               BATCH_BYTES / BATCH_NS["batched"] / copy_gbps, 2)

    hs = section(md, "Host syncs")
    for then, ns in HOST_SYNC_NS.items():
        assert_num(cell(hs, then, "us per iteration"), ns / 1e3, 1)
        assert_num(cell(hs, then, "us over the copy alone"),
                   (ns - HOST_SYNC_NS["nothing"]) / 1e3, 1)

    fl = section(md, "Kernels: measured vs floor")
    sh = "q4096_k32768"
    floor_ms = prefill_flops(sh) / (GEMM_TFLOPS * 1e12) * 1e3
    assert_num(cell(fl, f"prefill/plain/{sh}", "floor ms"), floor_ms, 3)
    assert_num(cell(fl, f"prefill/plain/{sh}", "measured / floor"),
               PREFILL_NS[("plain", sh)] / 1e6 / floor_ms, 2)
    assert_num(cell(fl, f"prefill/plain/{sh}", "SDPA flash / floor"), FLASH_MS[sh] / floor_ms, 2)
    case = "short_question_and_decode/rows1/k131072_s16"
    floor_ms = kv_bytes(131072) / copy_bps * 1e3
    assert_num(cell(fl, case, "measured / floor"), SHORT_NS[(1, 131072, 16)] / 1e6 / floor_ms, 2)
    case = "memory_bound/merge_states_8x4096x32x128_bf16"
    assert_num(cell(fl, case, "measured / floor"), MERGE_NS / 1e6 / (MERGE_BYTES / copy_bps * 1e3), 2)
    # 64 rows x 32 heads over 32K keys: 34 GFLOP, about as long at the GEMM rate as reading the
    # 134 MB of K and V at the copy rate; the floor is the longer of the two.
    floor_ms = max(kv_bytes(32768) / copy_bps * 1e3,
                   prefill_flops("q64_k32768") / (GEMM_TFLOPS * 1e12) * 1e3)
    assert_num(cell(fl, "block_attention_shift/separate/rows64_k32768_s16", "measured / floor"),
               SHIFT_SEPARATE_NS / 1e6 / floor_ms, 2)

    acc = section(md, "Accuracy")
    assert cell(acc, "ctx_256x4096", "ours") == "2.50e-03"
    assert cell(acc, "decode_1x8192", "SDPA cuDNN") == "No available kernel."

    t = section(md, "Time to first token")
    assert_num(cell(t, "8192", "sequential / APE"),
               TTFT_MS[("sequential", 8192)] / TTFT_MS[("ape", 8192)], 1)

    tf = section(md, "TTFT: measured vs floor")
    prefix, q = 32, 64
    for mode, label in [("ape", "APE"), ("block-attention", "Block-Attention")]:
        f = llama_floor_ms(q, prefix + 32768, copy_bps, GEMM_TFLOPS * 1e12)
        assert_num(cell(tf, ("32768", label), "floor"), f, 1)
        assert_num(cell(tf, ("32768", label), "measured / floor"), TTFT_MS[(mode, 32768)] / f, 2)
    f = llama_floor_ms(prefix + 32768 + q, 0, copy_bps, GEMM_TFLOPS * 1e12)
    assert_num(cell(tf, ("32768", "sequential"), "floor"), f, 1)
    assert_num(cell(tf, ("32768", "sequential"), "measured / floor"),
               TTFT_MS[("sequential", 32768)] / f, 2)
    assert cell(tf, ("32768", "sequential"), "bound") == "compute"
    assert cell(tf, ("4096", "APE"), "bound") == "memory"
    assert "prefill + 256 tokens at 32768, ape: 2900 ms (TTFT 31.5 ms)" in md
    check_plots(out, md, err, PLOTS)
    return out


def test_empty():
    out = tempfile.mkdtemp(prefix="summarize_empty_")
    md, err = run(out)
    assert "Device: n/a" in md and "n/a" in section(md, "Prefill")
    assert cell(section(md, "Block-Attention shift"), "rows64_k32768_s16", "separate / fused") == "n/a"
    check_plots(out, md, err, [])


def test_minimal_peer():
    out = tempfile.mkdtemp(prefix="summarize_minpeer_")
    with open(os.path.join(out, "peer.json"), "w") as f:
        json.dump({"device": "Some GPU", "torch": "2.4.0", "cases": {}}, f)
    md, err = run(out)
    assert "Device: Some GPU; torch 2.4.0" in md
    assert cell(section(md, "Prefill"), "q1024_k8192", "SDPA flash") == "n/a"
    assert cell(section(md, "Kernels: measured vs floor"), "prefill/plain/q1024_k8192",
                "floor ms") == "n/a"
    check_plots(out, md, err, [])


def test_partial():
    """No criterion copy and no GEMM rate: memory floors fall back to peer.py's copy, compute
    floors (prefill, TTFT) are n/a; the prefill plot has nothing to show."""
    out = tempfile.mkdtemp(prefix="summarize_partial_")
    write_criterion(out, "short_question_and_decode/rows64/k32768_s16", 70_000,
                    {"Bytes": kv_bytes(32768)})
    torch_copy_ms = 0.75
    copy = {"ms": torch_copy_ms, "gbps": COPY_BYTES / (torch_copy_ms * 1e6)}
    with open(os.path.join(out, "peer.json"), "w") as f:
        json.dump({"device": DEVICE, "torch": "2.5.1", "cases": {"copy_d2d_1GiB/torch": copy}}, f)
    with open(os.path.join(out, "e2e.jsonl"), "w") as f:
        for ctx, ms in [(4096, 21.0), (8192, 23.0)]:
            f.write(json.dumps({"bench": "ttft", "device": DEVICE, "mode": "ape",
                                "context": ctx, "question": 64, "ttft_ms": ms}) + "\n")
    md, err = run(out)
    fl = section(md, "Kernels: measured vs floor")
    floor_ms = kv_bytes(32768) / (COPY_BYTES / (torch_copy_ms * 1e-3)) * 1e3
    assert_num(cell(fl, "short_question_and_decode/rows64/k32768_s16", "measured / floor"),
               0.070 / floor_ms, 2)
    assert cell(fl, "prefill/plain/q1024_k8192", "floor ms") == "n/a"
    tf = section(md, "TTFT: measured vs floor")
    assert cell(tf, ("4096", "APE"), "floor") == "n/a"
    assert cell(tf, ("4096", "sequential"), "measured") == "n/a"
    check_plots(out, md, err, ["plot_ttft.png", "plot_bandwidth.png"])


def main():
    keep = sys.argv[1] if len(sys.argv) > 1 else None  # a folder to keep the full run's files in
    if keep:
        os.makedirs(keep, exist_ok=True)
    out = test_full(keep)
    test_empty()
    test_minimal_peer()
    test_partial()
    print(f"ok ({'with' if HAS_MPL else 'without'} matplotlib; full run in {out})")


if __name__ == "__main__":
    main()
