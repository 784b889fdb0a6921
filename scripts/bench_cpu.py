"""The CPU benchmark's driver (run by scripts/bench-cpu.sh): our CPU forward pass (ape-llama's
example `bench_cpu`) against llama.cpp (llama-cpp-python) on the same GGUF file, the same thread
count and the same token ids, one process per measurement, the two sides alternating.

Measurements, each timed inside its process after the model is loaded:
- prefill tokens/s at 512 and 2048 tokens: one forward over the prompt, the last row's logits;
- decode tokens/s after 0, 1K and 4K tokens of context (prefilled untimed): 64 single-token
  steps feeding fixed ids, the greedy next token taken from every step's logits;
- time to first token of a 64-token question over 16 passages of 256 tokens: ours reads the
  passages from a disk block store written once by a warm-up process (APE mode) and prefills the
  question over them; llama.cpp prefills all 16 * 256 + 64 tokens;
- the peak RSS of every process (ru_maxrss from the driver's wait for it, for both sides).

The ids are pseudo-random (seeded) in [256, 32000): ordinary tokens in every Llama vocabulary.
They are written to <out>/ids.json, which both sides read.

Writes <out>/results.md (the table), <out>/results.json (every measurement), <out>/ratios.png
(when matplotlib is there) and prints the table. --write-benchmarks replaces the section of
BENCHMARKS.md between `<!-- bench-cpu:LABEL:begin -->` and `<!-- bench-cpu:LABEL:end -->` (appended
when missing).

`python bench_cpu.py peer CASE ...` is llama.cpp's side of one measurement (the venv's python
runs it); `python bench_cpu.py run ...` is the driver.
"""
import argparse
import datetime
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ID_RANGE = (256, 32000)
SEED = 20261207
# Sizes of each case: the full run, and --quick (tiny, for the test command).
FULL = {"prefill": [512, 2048], "decode": [0, 1024, 4096], "steps": 64,
        "passages": 16, "passage_len": 256, "question": 64}
QUICK = {"prefill": [32, 64], "decode": [0, 64], "steps": 4,
         "passages": 4, "passage_len": 16, "question": 8}
# llama.cpp's batch sizes: a prompt of up to 2048 tokens goes to one llama_decode call, which
# llama.cpp splits into micro-batches of 512 (its default).
PEER_N_BATCH, PEER_N_UBATCH = 2048, 512


def cases(sizes):
    """The measurements, in the order each round runs them: (key, case, arguments)."""
    out = [(f"prefill {n}", "prefill", {"tokens": n}) for n in sizes["prefill"]]
    out += [(f"decode @{c}", "decode", {"context": c, "steps": sizes["steps"]})
            for c in sizes["decode"]]
    ttft = {k: sizes[k] for k in ("passages", "passage_len", "question")}
    out.append(("ttft", "ttft", ttft))
    return out


def ids_needed(sizes):
    """How many ids the longest case reads."""
    return max(max(sizes["prefill"]), max(sizes["decode"]) + sizes["steps"],
               sizes["passages"] * sizes["passage_len"] + sizes["question"])


def case_args(args):
    """A case's arguments as command-line options (the same names on both sides)."""
    out = []
    for k, v in args.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def run_child(cmd, env, log):
    """Runs one measurement process; returns its JSON line and its peak RSS in KiB."""
    with tempfile.TemporaryFile() as out, open(log, "ab") as err:
        err.write(("$ " + " ".join(cmd) + "\n").encode())
        err.flush()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode(errors="replace")
    if p.returncode != 0:
        sys.exit(f"measurement failed (exit {p.returncode}): {' '.join(cmd)}\n"
                 f"see {log}:\n" + "".join(open(log, errors="replace").readlines()[-15:]))
    lines = [l for l in text.splitlines() if l.startswith("{")]
    if not lines:
        sys.exit(f"no JSON line from {' '.join(cmd)}; stdout: {text[-2000:]}")
    return json.loads(lines[-1]), usage.ru_maxrss


def cpu_model():
    """The CPU's name from /proc/cpuinfo, with the core count this process may use."""
    name = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {len(os.sched_getaffinity(0))} cores"


def git_rev():
    """The commit of the tree measured (marked dirty when it has changes)."""
    try:
        rev = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"],
                             capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        rev = "unknown"
    return rev


def value(case, result):
    """The figure a measurement reports: tokens/s, or milliseconds for the first token."""
    return result["ttft_ms"] if case == "ttft" else result["tokens_per_s"]


def label_of(key, sizes):
    """A row's name in the table."""
    kind, _, n = key.partition(" ")
    if kind == "prefill":
        return f"prefill {n} tokens (tokens/s)"
    if kind == "decode":
        return f"decode after {n[1:]} tokens of context, {sizes['steps']} steps (tokens/s)"
    return (f"time to first token: {sizes['question']}-token question over "
            f"{sizes['passages']} x {sizes['passage_len']}-token passages (ms)")


def fmt(x, ttft):
    """A figure with sensible precision."""
    if x is None:
        return "-"
    if ttft:
        return f"{x:.0f}" if x >= 100 else f"{x:.1f}"
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def ratio(a, b):
    """a / b, printed; '-' when either is missing."""
    if a is None or b is None or b == 0:
        return "-"
    r = a / b
    return f"{r:.3f}x" if r < 0.1 else f"{r:.2f}x"


def table(records, sizes, meta):
    """The Markdown report: header lines, the table of medians, the notes."""
    med = {}
    for key, _, _ in cases(sizes):
        for side in ("ours", "llama.cpp"):
            rs = [r for r in records if r["key"] == key and r["side"] == side]
            if rs:
                med[key, side] = (statistics.median(r["value"] for r in rs),
                                  statistics.median(r["rss_kib"] for r in rs) / 1024)
    sides = ("ours and llama.cpp alternating (the order swapped every round)"
             if meta["peer_run"] else "our side only (--ours-only)")
    lines = [
        f"{meta['date']}, {meta['cpu']}, {meta['threads']} threads on both sides, "
        f"{meta['rounds']} round(s), one process per measurement, {sides}; each figure is the "
        "median over the rounds, each ratio a ratio of medians.",
        "",
        f"Model `{meta['model']}`; ours at `{meta['rev']}` (`bench_cpu` example, release); "
        f"llama.cpp: {meta['peer']}.",
        "",
        f"Command: `{meta['command']}`",
        "",
        "| measurement | ours | llama.cpp | ours / llama.cpp | ours peak RSS MiB "
        "| llama.cpp peak RSS MiB | RSS ours / llama.cpp |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, case, _ in cases(sizes):
        o, p = med.get((key, "ours")), med.get((key, "llama.cpp"))
        ttft = case == "ttft"
        lines.append(
            f"| {label_of(key, sizes)} | {fmt(o and o[0], ttft)} | {fmt(p and p[0], ttft)} "
            f"| {ratio(o and o[0], p and p[0])} | {fmt(o and o[1], True)} "
            f"| {fmt(p and p[1], True)} | {ratio(o and o[1], p and p[1])} |")
    same = [r for r in records if r["case"] == "prefill"]
    agree = sum(1 for r in same if r["side"] == "ours" and any(
        q["side"] == "llama.cpp" and q["key"] == r["key"] and q["next"] == r["next"]
        for q in same))
    n_ours = sum(1 for r in same if r["side"] == "ours")
    lines += [
        "",
        "Higher is better for tokens/s (ratio > 1: ours faster); lower is better for the time to "
        "first token and RSS (ratio < 1: ours faster or smaller).",
        "",
        "- Both sides read the same ids (`ids.json`: seeded pseudo-random ids in "
        f"[{ID_RANGE[0]}, {ID_RANGE[1]})); timings start after the model is loaded and end "
        "when the greedy next token is known (the argmax of the last logits).",
        "- Prefill: one forward over the prompt with the last row's logits. Ours: "
        "`LlamaModel::forward` over all tokens; llama.cpp: `Llama.eval` (n_batch "
        f"{PEER_N_BATCH}, n_ubatch {PEER_N_UBATCH}, logits of the last row only).",
        "- Decode: the context prefilled untimed, then single-token steps feeding fixed ids "
        "(the same on both sides), every step's logits and argmax computed. Ours: "
        "`forward` of one token over the cached K/V then `append_block` (what the engine's "
        "`decode_step` does); llama.cpp: `Llama.eval([id])`.",
        "- Time to first token: ours reads the passages as cached blocks from a disk block store "
        "(written once by an untimed warm-up process; the reads hit the page cache), then "
        "prefills the question over them in APE mode (`Engine::prefill`), all in the timed "
        "process. llama.cpp prefills every passage and the question: its prompt cache reuses a "
        "prefix only, never a passage at another position or in another order, so it cannot "
        "skip them.",
        "- llama.cpp runs with llama-cpp-python's defaults otherwise (flash attention off, f16 "
        "K/V cache, n_ctx the case's length), weights read at load (`use_mmap=False`, so no page "
        "faults in the timed region). Ours keeps each weight in its file's quantisation and "
        "multiplies it with 8-bit activations, as llama.cpp does; its K/V cache is f32 (twice "
        "llama.cpp's f16 bytes).",
        "- Peak RSS: `ru_maxrss` of each measurement's own process, from the driver's wait; the "
        "table gives the median per case for both sides. llama.cpp's process includes the "
        "Python interpreter, numpy and the binding (about 30 MiB).",
    ]
    loads = [r["loadavg"] for r in records]
    lines.append(
        f"- The machine's 1-minute load average as each process started: median "
        f"{statistics.median(loads):.1f}, {min(loads):.1f} to {max(loads):.1f}, on "
        f"{len(os.sched_getaffinity(0))} cores. Above the core count other work shares the "
        "cores, and both sides slow down; llama.cpp more, as its threads meet at a spinning "
        "barrier after every operation of the graph, each a wait for a descheduled thread.")
    if meta["peer_run"] and not meta["peer_extra_bufts"]:
        lines.append("- llama.cpp crashed on this machine with its extra buffer types (a general "
                     "protection fault in ggml's AMX matmul: the CPU reports AMX, the machine does "
                     "not let the process use it), so it ran with `use_extra_bufts=False`: no AMX, "
                     "no repacked weights, its plain CPU kernels (AVX-512).")
    if n_ours and meta["peer_run"]:
        lines.append(f"- Sanity: the greedy token after the prefill agreed between the sides in "
                     f"{agree} of {n_ours} prefill measurements (both quantise activations to 8 "
                     "bits, each rounding its own way: close logits, not equal).")
    return "\n".join(lines) + "\n", med


def plot(med, sizes, path):
    """Bar chart of ours / llama.cpp per measurement (log scale); skipped without matplotlib."""
    try:
        import matplotlib
        import matplotlib.ticker
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return False
    names, ratios, colors = [], [], []
    for key, case, _ in cases(sizes):
        o, p = med.get((key, "ours")), med.get((key, "llama.cpp"))
        if not (o and p):
            continue
        # Speed-up of ours: > 1 is ours faster, for throughput and for TTFT alike.
        r = o[0] / p[0] if case != "ttft" else p[0] / o[0]
        names.append(key if case != "ttft" else "TTFT")
        ratios.append(r)
        colors.append("tab:green" if r >= 1 else "tab:red")
    if not names:
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(names, ratios, color=colors)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_yticks([t for t in (0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100)
                   if min(ratios) / 3 <= t <= max(ratios) * 3])
    ax.set_ylabel("ours speed / llama.cpp speed (log)")
    ax.set_title("CPU forward pass against llama.cpp (> 1: ours faster)")
    for i, r in enumerate(ratios):
        ax.annotate(f"{r:.3g}x", (i, r), ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def write_benchmarks(label, report, out_dir, has_plot):
    """Replaces (or appends) BENCHMARKS.md's section for `label` between its markers."""
    path = os.path.join(ROOT, "BENCHMARKS.md")
    begin, end = f"<!-- bench-cpu:{label}:begin -->", f"<!-- bench-cpu:{label}:end -->"
    rel = os.path.relpath(out_dir, ROOT)
    body = [begin, f"### CPU forward pass against llama.cpp ({label})", "",
            "Written by `scripts/bench-cpu.sh --write-benchmarks` (see above); raw figures in "
            f"`{rel}/results.json`.", "", report.rstrip("\n")]
    if has_plot:
        body += ["", f"![ours / llama.cpp]({rel}/ratios.png)"]
    body.append(end)
    text = open(path).read()
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + "\n".join(body) + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(body) + "\n"
    open(path, "w").write(text)
    print(f"updated {path} (section {label})", file=sys.stderr)


def probe_peer(a, ids_path, env, log):
    """llama.cpp's flags for this machine: none, or --no-extra-bufts when a short prompt with its
    extra buffer types crashes (ggml's AMX matmul faults on machines that report AMX but do not
    let a process use it, such as some virtual machines)."""
    cmd = [a.peer_python, os.path.abspath(__file__), "peer", "probe", "--model", a.model,
           "--threads", str(a.threads), "--ids", ids_path]
    with open(log, "ab") as err:
        ok = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env).returncode == 0
    if ok:
        return []
    print("llama.cpp crashed on a short prompt with its extra buffer types (AMX, repacked "
          "weights): running it with use_extra_bufts=False", file=sys.stderr)
    subprocess.run(cmd + ["--no-extra-bufts"], check=True, stdout=subprocess.DEVNULL, env=env)
    return ["--no-extra-bufts"]


def driver(a):
    """Runs every case for every round, alternating sides; writes and prints the report."""
    sizes = dict(QUICK if a.quick else FULL)
    for name in ("prefill", "decode"):
        given = getattr(a, name)
        if given:
            try:
                sizes[name] = [int(x) for x in given.split(",")]
            except ValueError:
                sys.exit(f"--{name} takes comma-separated token counts, not {given!r}")
            if not sizes[name] or min(sizes[name]) < (1 if name == "prefill" else 0):
                sys.exit(f"--{name}: bad token counts {given!r}")
    rounds = a.rounds if a.rounds is not None else (1 if a.quick else 5)
    if rounds < 1:
        sys.exit("--rounds must be at least 1")
    if a.threads < 1:
        sys.exit("--threads must be at least 1")
    if not os.path.isfile(a.model):
        sys.exit(f"model {a.model} not found (scripts/fetch-model.sh fetches the default one)")
    if not os.access(a.bin, os.X_OK):
        sys.exit(f"our benchmark program {a.bin} is not built (scripts/bench-cpu.sh builds it)")
    peer = not a.ours_only
    if peer and not a.peer_python:
        sys.exit("--peer-python is needed unless --ours-only")
    scratch = os.path.join(ROOT, "target", "bench-cpu-runs")
    out = a.out or os.path.join(scratch if a.quick else os.path.join(ROOT, "bench-results", "cpu"),
                                a.label)
    os.makedirs(out, exist_ok=True)
    os.makedirs(scratch, exist_ok=True)
    rev = git_rev()  # the tree as the run starts
    work = tempfile.mkdtemp(prefix="ape-bench-cpu-")
    # Every process's command and stderr (not kept with the results).
    log = os.path.join(scratch, "processes.log")
    open(log, "w").close()
    try:
        rng = random.Random(SEED)
        ids = [rng.randrange(*ID_RANGE) for _ in range(ids_needed(sizes))]
        ids_path = os.path.join(out, "ids.json")
        json.dump({"ids": ids, "seed": SEED, "range": list(ID_RANGE)}, open(ids_path, "w"))
        env = dict(os.environ, MATMUL_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads),
                   RAYON_NUM_THREADS=str(a.threads))
        common = ["--model", a.model, "--threads", str(a.threads), "--ids", ids_path]
        store = os.path.join(work, "store")
        peer_version = "not run (--ours-only)"
        peer_flags = []
        if peer:
            peer_version = subprocess.run(
                [a.peer_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                capture_output=True, text=True, check=True).stdout.strip()
            peer_version = (f"llama-cpp-python {peer_version} (llama.cpp built from source by "
                            "pip, default CPU flags)")
            peer_flags = probe_peer(a, ids_path, env, log)

        def command(side, case, args):
            extra = case_args(args) + (["--store", store] if case == "ttft" else [])
            if side == "ours":
                return [a.bin, case] + common + extra
            return ([a.peer_python, os.path.abspath(__file__), "peer", case] + common + extra
                    + peer_flags)

        ttft_args = next(args for _, case, args in cases(sizes) if case == "ttft")
        started = time.time()
        print(f"warm-up: encoding the {ttft_args['passages']} passages into the block store",
              file=sys.stderr)
        warm, _ = run_child([a.bin, "warm"] + common + case_args(ttft_args) + ["--store", store],
                            env, log)
        print(f"  {warm['tokens_encoded']} tokens encoded in {warm['seconds']:.1f} s",
              file=sys.stderr)
        records = []
        sides = ["ours", "llama.cpp"] if peer else ["ours"]
        for r in range(rounds):
            order = sides if r % 2 == 0 else sides[::-1]
            for key, case, args in cases(sizes):
                for side in order:
                    load = os.getloadavg()[0]
                    res, rss = run_child(command(side, case, args), env, log)
                    rec = {"round": r + 1, "side": side, "key": key, "case": case,
                           "value": value(case, res), "rss_kib": rss, "loadavg": load,
                           "load_s": res.get("load_s"), "next": res.get("next"), "raw": res}
                    records.append(rec)
                    unit = "ms" if case == "ttft" else "tokens/s"
                    print(f"round {r + 1}/{rounds} {key:<14} {side:<9} {rec['value']:10.2f} "
                          f"{unit:<8} peak RSS {rss / 1024:7.1f} MiB "
                          f"[{time.time() - started:5.0f} s]", file=sys.stderr)
        meta = {"date": datetime.date.today().isoformat(), "cpu": cpu_model(),
                "threads": a.threads, "rounds": rounds, "model": os.path.basename(a.model),
                "rev": rev, "peer": peer_version, "peer_run": peer,
                "peer_extra_bufts": "--no-extra-bufts" not in peer_flags,
                "command": a.command or " ".join(sys.argv)}
        report, med = table(records, sizes, meta)
        report += (f"\nThe run took {time.time() - started:.0f} s in all (warm-up included, "
                   "model loads included).\n")
        open(os.path.join(out, "results.md"), "w").write(report)
        json.dump({"meta": meta, "sizes": sizes, "warm": warm, "records": records},
                  open(os.path.join(out, "results.json"), "w"), indent=1)
        has_plot = plot(med, sizes, os.path.join(out, "ratios.png")) if peer else False
        print(report)
        print(f"results in {out}", file=sys.stderr)
        if a.write_benchmarks:
            write_benchmarks(a.label, report, out, has_plot)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def peer_main(a):
    """llama.cpp's side of one measurement: prints one JSON line, as our side does."""
    import numpy as np
    import llama_cpp

    if a.no_extra_bufts:
        # The binding has no argument for llama_model_params.use_extra_bufts: its constructor
        # starts from llama_model_default_params(), which this wraps.
        defaults = llama_cpp.llama_cpp.llama_model_default_params

        def without_extra_bufts():
            params = defaults()
            params.use_extra_bufts = False
            return params

        llama_cpp.llama_cpp.llama_model_default_params = without_extra_bufts
    ids = json.load(open(a.ids))["ids"]
    if a.case == "probe":
        llm = llama_cpp.Llama(model_path=a.model, n_ctx=64, n_threads=a.threads,
                              n_threads_batch=a.threads, verbose=False)
        llm.eval(ids[:16])
        print(json.dumps({"side": "llama.cpp", "case": "probe", "ok": True}))
        return
    if a.case == "prefill":
        prompt, feed = ids[:a.tokens], []
    elif a.case == "decode":
        prompt, feed = ids[:a.context], ids[a.context:a.context + a.steps]
    else:
        prompt, feed = ids[:a.passages * a.passage_len + a.question], []
    need = len(prompt) + len(feed)
    want = {"prefill": lambda: a.tokens, "decode": lambda: a.context + a.steps,
            "ttft": lambda: a.passages * a.passage_len + a.question}[a.case]()
    if need != want:
        sys.exit(f"the ids file holds {len(ids)} ids, this case needs {want}")
    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=a.model, n_ctx=need, n_threads=a.threads,
                          n_threads_batch=a.threads, n_batch=PEER_N_BATCH,
                          n_ubatch=PEER_N_UBATCH, use_mmap=False, logits_all=False,
                          verbose=False)
    load_s = time.perf_counter() - start
    vocab = llm.n_vocab()

    def argmax():
        row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(row, shape=(vocab,))))

    res = {"side": "llama.cpp", "case": a.case, "load_s": load_s, "threads": a.threads,
           "version": llama_cpp.__version__}
    if a.case == "decode":
        if prompt:
            llm.eval(prompt)
        t = time.perf_counter()
        for tok in feed:
            llm.eval([tok])
            nxt = argmax()
        dt = time.perf_counter() - t
        res.update(context=a.context, steps=a.steps, seconds=dt, tokens_per_s=a.steps / dt)
    else:
        t = time.perf_counter()
        llm.eval(prompt)
        nxt = argmax()
        dt = time.perf_counter() - t
        res.update(seconds=dt)
        if a.case == "prefill":
            res.update(tokens=a.tokens, tokens_per_s=a.tokens / dt)
        else:
            res.update(passages=a.passages, passage_len=a.passage_len, question=a.question,
                       ttft_ms=dt * 1e3, tokens_encoded=len(prompt))
    res["next"] = nxt
    print(json.dumps(res))


def main():
    """Parses `run` (the driver) or `peer CASE` (one llama.cpp measurement)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="the benchmark (scripts/bench-cpu.sh runs this)")
    r.add_argument("--model", required=True, help="the GGUF file both sides load")
    r.add_argument("--bin", required=True, help="our measurement program (bench_cpu example)")
    r.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="threads on both sides (default: the cores this process may use)")
    r.add_argument("--rounds", type=int, help="rounds per side (default 5; 1 with --quick)")
    r.add_argument("--quick", action="store_true", help="tiny sizes, 1 round")
    r.add_argument("--ours-only", action="store_true", help="our side only (no llama.cpp)")
    r.add_argument("--prefill", help="prefill sizes, comma-separated (default 512,2048)")
    r.add_argument("--decode", help="decode contexts, comma-separated (default 0,1024,4096)")
    r.add_argument("--peer-python", help="the python of the venv holding llama_cpp")
    r.add_argument("--label", default="latest",
                   help="names the results folder and the BENCHMARKS.md section")
    r.add_argument("--out", help="results folder (default bench-results/cpu/LABEL; "
                   "target/bench-cpu-runs/LABEL with --quick)")
    r.add_argument("--write-benchmarks", action="store_true",
                   help="replace the section for LABEL in BENCHMARKS.md")
    r.add_argument("--command", help="the command line to record in the report")
    q = sub.add_parser("peer", help="one llama.cpp measurement")
    q.add_argument("case", choices=["prefill", "decode", "ttft", "probe"])
    q.add_argument("--no-extra-bufts", action="store_true",
                   help="llama.cpp without extra buffer types (no AMX, no weight repacking)")
    q.add_argument("--model", required=True)
    q.add_argument("--threads", type=int, required=True)
    q.add_argument("--ids", required=True)
    q.add_argument("--tokens", type=int)
    q.add_argument("--context", type=int)
    q.add_argument("--steps", type=int)
    q.add_argument("--store", help="ignored: llama.cpp has no block store")
    q.add_argument("--passages", type=int)
    q.add_argument("--passage-len", type=int)
    q.add_argument("--question", type=int)
    a = p.parse_args()
    if a.cmd == "run":
        driver(a)
    else:
        peer_main(a)


if __name__ == "__main__":
    main()
