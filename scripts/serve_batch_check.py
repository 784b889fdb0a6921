"""`ape serve` on a device: greedy answers to a few requests (APE, Block-Attention, sequential,
APE with other T and S) sent one at a time, then all at once; the answers must be equal, and the
concurrent ones must have been decoded in shared steps (the server's decode_batch_rows).

Usage: python3 scripts/serve_batch_check.py APE_BINARY MODEL_GGUF DEVICE [MAX_TOKENS]

Standard library only. scripts/test-emulated-gpu.sh runs it with DEVICE cuda on the emulated CUDA
device: the GPU forward pass's batched decode (one attention launch for every sequence) behind
the server.
"""

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request

PASSAGES = [
    "The Lantern Bakery was founded by Mira Kovac in 1987 in the river town of Esterhill.",
    "Esterhill is a small town on the river Vel, known for its stone bridges.",
    "In 2004 the bakery opened a second shop in Marrow Bay, run by Tomas Kovac.",
]
MODES = [{"mode": "ape"}, {"mode": "block-attention"}, {"mode": "sequential"},
         {"mode": "ape", "temperature": 0.8, "scale": 1.1}]


def main():
    binary, model, device = sys.argv[1], sys.argv[2], sys.argv[3]
    max_tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 6
    proc = subprocess.Popen(
        [binary, "serve", "--device", device, "--addr", "127.0.0.1:0", "--no-store",
         "--model", model], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base, log, deadline = None, [], time.time() + 600
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        log.append(line)
        if "listening on " in line:
            base = line.split("listening on ")[1].split()[0]
            break
    if base is None:
        proc.kill()
        sys.exit("ape serve did not start:\n" + "".join(log))
    threading.Thread(target=lambda: [log.append(x) for x in proc.stderr], daemon=True).start()

    def ask(ape):
        body = json.dumps({
            "messages": [{"role": "user", "content": "Who founded the Lantern Bakery?"}],
            "documents": [{"text": p} for p in PASSAGES], "ape": ape,
            "temperature": 0, "max_tokens": max_tokens}).encode()
        req = urllib.request.Request(base + "/v1/chat/completions", data=body,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.load(r)["choices"][0]["message"]["content"]

    def rows():
        with urllib.request.urlopen(base + "/metrics", timeout=60) as r:
            m = dict(l.split()[:2] for l in r.read().decode().splitlines()
                     if l.startswith("ape_decode_batch_rows_s") or l.startswith("ape_decode_batch_rows_c"))
        return float(m["ape_decode_batch_rows_sum"]), float(m["ape_decode_batch_rows_count"])

    failed = False
    try:
        alone = [ask(m) for m in MODES]
        before = rows()
        together = [None] * len(MODES)

        def worker(i):
            together[i] = ask(MODES[i])
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(MODES))]
        [t.start() for t in threads]
        [t.join() for t in threads]
        after = rows()
        steps = after[1] - before[1]
        mean = (after[0] - before[0]) / steps if steps else 0.0
        for m, a, b in zip(MODES, alone, together):
            same = a == b
            failed |= not same
            print(f"{'ok' if same else 'DIFFERENT'}: {json.dumps(m)}: alone {a!r}, together {b!r}")
        print(f"concurrent requests: {int(steps)} decode steps, {mean:.2f} sequences per step")
        if mean <= 1.0:
            print("FAILED: the concurrent requests were not decoded together")
            failed = True
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "killed"
    if code != 0:
        print(f"FAILED: the server exited with {code}:\n" + "".join(log[-20:]))
        failed = True
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
