"""A stand-in for peer.py in the session's dry run on the emulated device (dry-run.sh), where
there is no PyTorch: the same JSON keys for the same shapes (peer.py's own plan(), read from the
peer.py beside this folder), with made-up times, so the dry run checks that the benchmarks' ids,
the peer's keys and summarize.py agree. Nothing here is a measurement: the device field says so."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import peer  # noqa: E402  (peer.py imports PyTorch only when run as a script)

HEADS, KV_HEADS, D = peer.HEADS, peer.KV_HEADS, peer.D


def main():
    quick = sys.argv[1:] == ["--quick"]
    p = peer.plan(quick)
    res = {"device": "dry-run stand-in (no PyTorch; made-up times)", "torch": "none",
           "stand_in": True, "cases": {}, "gemm_bf16_tflops": 1.0}
    for rows, keys in p["prefill"]:
        flops = 4 * rows * keys * HEADS * D
        for name in ("flash", "cudnn"):
            ms = flops / 1e9  # 1 TFLOP/s
            res["cases"][f"prefill/q{rows}_k{keys}/{name}"] = {
                "ms": ms, "how": "stand-in", "tflops": flops / (ms * 1e9)}
    for rows, keys in p["short"]:
        byts = 2 * keys * KV_HEADS * D * 2
        for name in ("flash", "cudnn"):
            ms = byts / 1e8  # 100 GB/s
            res["cases"][f"short_question_and_decode/rows{rows}/k{keys}/{name}"] = {
                "ms": ms, "how": "stand-in", "gbps": byts / (ms * 1e6)}
    for n_seqs, keys in p["batch"]:
        byts = n_seqs * 2 * keys * KV_HEADS * D * 2
        for name in ("flash", "cudnn"):
            ms = byts / 1e8
            res["cases"][f"batch_decode/n{n_seqs}_k{keys}/{name}"] = {
                "ms": ms, "how": "stand-in", "gbps": byts / (ms * 1e6)}
    n = p["copy_bytes"]
    res["cases"][f"copy_d2d_{peer.bytes_label(n)}/torch"] = {"ms": 2 * n / 1e8,
                                                             "gbps": 100.0}
    json.dump(res, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
