"""The peer measured in the same GPU run as our kernels: PyTorch scaled_dot_product_attention
(flash and cuDNN backends) on the shapes of benches/kernels.rs, a device-to-device copy, a dense
bf16 GEMM (the compute rate of summarize.py's floors), and SDPA's accuracy on the inputs of the
`sdpa_comparison_cases` GPU test (same integer-hash fill). Prints one JSON object.

    python3 peer.py [--quick]

--quick: the shapes of the session's quick phase (APE_BENCH_SET=quick in benches/kernels.rs),
without the accuracy cases. APE_BENCH_SHRINK=N divides the keys, the prefill rows, the batch
size (to 2 at least) and the copy by N, as it does in benches/kernels.rs. The shapes are `plan()`'s, which the session's dry run
(scripts/gpu/dry-run/peer.py) reads without PyTorch."""
import json
import os
import sys

DEV = "cuda"
HEADS, KV_HEADS, D = 32, 8, 128


def plan(quick):
    """The cases, as in benches/kernels.rs: prefill (rows, keys), short question and decode
    (rows, keys), batched decode (sequences, keys each), and the copy's bytes."""
    shrink = max(1, int(os.environ.get("APE_BENCH_SHRINK", "1") or 1))

    def s(n):
        return max(1, n // shrink)

    if quick:
        prefill, short, batch = [(8192, 8192)], [(64, 32768), (1, 131072)], [(64, 4096)]
    else:
        prefill = [(1024, 8192), (1024, 32768), (4096, 32768), (8192, 65536)]
        short = [(rows, keys) for keys in (32768, 131072) for rows in (64, 1)]
        batch = []
    return {"prefill": [(s(r), s(k)) for r, k in prefill],
            "short": [(r, s(k)) for r, k in short],
            "batch": [(max(2, s(n)), s(k)) for n, k in batch],
            "copy_bytes": s(1 << 30)}


def bytes_label(n):
    """benches/kernels.rs's bytes_label: 1GiB, 16MiB or 4096B."""
    if n >= 1 << 30 and n % (1 << 30) == 0:
        return f"{n >> 30}GiB"
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}MiB"
    return f"{n}B"


def fill(shape, seed, scale=1.0, dtype=None):
    """The hash fill of benches/kernels.rs and tests/gpu_segmented_attention.rs (row-major),
    bf16 unless `dtype` says otherwise."""
    dtype = dtype or torch.bfloat16
    n = 1
    for s in shape:
        n *= s
    i = torch.arange(n, dtype=torch.int64, device=DEV)
    x = (i * 2654435761 + seed * 40503) & 0xFFFFFFFF
    x = (x >> 8).to(torch.float64) / 16777216.0 - 0.5
    return (x * scale).reshape(shape).to(dtype)


def first_line(e):
    """The start of an exception's message, for the JSON (which an empty message must not break)."""
    lines = str(e).splitlines()
    return (lines[0] if lines else type(e).__name__)[:160]


def to_bhld(x):
    """[L, H, D] -> [1, H, L, D]."""
    return x.permute(1, 0, 2).unsqueeze(0).contiguous()


def time_ms(fn, iters=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def sdpa_timed(q, k, v, backend, causal=False):
    """Median ms of SDPA with the given backend; GQA natively when supported, else K/V expanded
    before timing. Returns (ms, how) or (None, reason)."""
    group = q.shape[1] // k.shape[1]
    for how in ("enable_gqa", "expanded"):
        try:
            if how == "enable_gqa":
                kk, vv, kw = k, v, {"enable_gqa": True}
            else:
                kk, vv, kw = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), {}
            with sdpa_kernel(backend):
                fn = lambda: F.scaled_dot_product_attention(q, kk, vv, is_causal=causal, **kw)
                return time_ms(fn), how
        # A backend refuses this shape or option (RuntimeError), or a torch before 2.5 does not
        # know enable_gqa (TypeError).
        except (RuntimeError, TypeError) as e:
            last = first_line(e)
    return None, last


def gemm_tflops(n=8192):
    """Dense bf16 matrix product rate (n x n x n), the compute ceiling of summarize.py's floors.
    Hash-filled inputs, not zeros: a product of zeros can run faster than real data."""
    a, b = fill((n, n), 3), fill((n, n), 4)
    c = torch.empty_like(a)
    ms = time_ms(lambda: torch.matmul(a, b, out=c), iters=10)
    return 2 * n ** 3 / (ms * 1e9)


def main():
    quick = sys.argv[1:] == ["--quick"]
    if sys.argv[1:] not in ([], ["--quick"]):
        sys.exit("usage: peer.py [--quick]")
    p = plan(quick)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": {}}
    res["gemm_bf16_tflops"] = gemm_tflops()
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}

    for rows, keys in p["prefill"]:
        q = to_bhld(fill((rows, HEADS, D), 999))
        k, v = to_bhld(fill((keys, KV_HEADS, D), 1)), to_bhld(fill((keys, KV_HEADS, D), 2))
        flops = 4 * rows * keys * HEADS * D
        for name, be in backends.items():
            ms, how = sdpa_timed(q, k, v, be)
            res["cases"][f"prefill/q{rows}_k{keys}/{name}"] = {
                "ms": ms, "how": how, "tflops": flops / (ms * 1e9) if ms else None}
        del q, k, v

    for keys in sorted({k for _, k in p["short"]}):
        k, v = to_bhld(fill((keys, KV_HEADS, D), 1)), to_bhld(fill((keys, KV_HEADS, D), 2))
        byts = 2 * keys * KV_HEADS * D * 2
        for rows in [r for r, kk in p["short"] if kk == keys]:
            q = to_bhld(fill((rows, HEADS, D), 999))
            for name, be in backends.items():
                ms, how = sdpa_timed(q, k, v, be)
                res["cases"][f"short_question_and_decode/rows{rows}/k{keys}/{name}"] = {
                    "ms": ms, "how": how, "gbps": byts / (ms * 1e6) if ms else None}
        del k, v

    # A decode step of n sequences, one row each over its own keys: one batched SDPA call.
    for n_seqs, keys in p["batch"]:
        q = fill((n_seqs, HEADS, 1, D), 999)
        k, v = fill((n_seqs, KV_HEADS, keys, D), 1), fill((n_seqs, KV_HEADS, keys, D), 2)
        byts = n_seqs * 2 * keys * KV_HEADS * D * 2
        for name, be in backends.items():
            ms, how = sdpa_timed(q, k, v, be)
            res["cases"][f"batch_decode/n{n_seqs}_k{keys}/{name}"] = {
                "ms": ms, "how": how, "gbps": byts / (ms * 1e6) if ms else None}
        del q, k, v

    n = p["copy_bytes"]
    src = torch.empty(n, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    res["cases"][f"copy_d2d_{bytes_label(n)}/torch"] = {"ms": ms, "gbps": 2 * n / (ms * 1e6)}
    del src, dst
    if quick:
        json.dump(res, sys.stdout, indent=1)
        return

    # Accuracy on the inputs of tests/gpu_segmented_attention.rs::sdpa_comparison_cases:
    # heads 8, KV heads 2, d 128, q = fill(seed 11) * 8, k = fill(21) * 4, v = fill(22).
    acc = {}
    for name, rows, keys, causal in [("ctx_256x4096", 256, 4096, False),
                                     ("causal_1024", 1024, 1024, True),
                                     ("decode_1x8192", 1, 8192, False)]:
        q = to_bhld(fill((rows, 8, D), 11, 8.0))
        k = to_bhld(fill((keys, 2, D), 21, 4.0))
        v = to_bhld(fill((keys, 2, D), 22))
        kx, vx = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
        s = (q.double() @ kx.double().transpose(-1, -2)) / D ** 0.5
        if causal:
            s = s.masked_fill(torch.ones(rows, keys, device=DEV).triu(1).bool(), float("-inf"))
        ref = torch.softmax(s, -1) @ vx.double()
        for bname, be in backends.items():
            try:
                with sdpa_kernel(be):
                    out = F.scaled_dot_product_attention(q, kx, vx, is_causal=causal)
                err = ((out.double() - ref).norm() / ref.norm()).item()
            except (RuntimeError, TypeError) as e:
                err = first_line(e)
            acc[f"{name}/{bname}"] = err
    res["accuracy_rel_l2"] = acc
    json.dump(res, sys.stdout, indent=1)


if __name__ == "__main__":
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    main()
