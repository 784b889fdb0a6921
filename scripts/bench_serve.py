"""The serving benchmark's driver (run by scripts/bench-serve.sh): `ape serve` against llama.cpp's
OpenAI-compatible server (llama-cpp-python's `llama_cpp.server`) on a RAG workload, the same GGUF
file and thread count on both sides, one server at a time, each a subprocess on a free loopback
port.

The workload (seeded, written to <out>/workload.json): PASSAGES generated profiles of fictional
people (about 200 tokens each, every fact made up so that the model cannot answer from memory);
each request draws PER_REQUEST of them at random, in random order, and asks a short question about
one of them. Each server gets the same warm-up requests, then for each concurrency level its own
REQUESTS requests (the same ones on both servers; distinct between levels, so that no level meets
prompts an earlier level already sent in full). Greedy decoding (temperature 0), MAX_TOKENS tokens
at most, every request streamed.

Ours gets the passages as the `documents` extension (one cached block each) and the question as
the user's message; llama.cpp, which has no such field, gets the same text in the user's message:
each passage followed by a newline, then "Question: ...", which is the text of ape's prompt (the
system turn, each document rendered as its text and a newline, "Question: ...", the assistant
header, in ChatML). Both get the same system message.

Measured client-side, per request: the time to first token (from sending the request to the first
stream chunk with content), the end-to-end latency (to `data: [DONE]`), the completion tokens
(`usage` from the last chunk when the server sends it, otherwise the number of chunks with content)
and errors (a status other than 200, an error object in the stream, a stream ending without
[DONE], a timeout). Per server and concurrency: medians and p95 (nearest rank), output tokens/s in
all (completion tokens over the level's wall time). For ours, the concurrency-1 requests again in
each mode (`ape: {"mode": ...}`), and how often each mode's answer equals sequential's.

Writes <out>/results.md (the tables), <out>/results.json (every request), <out>/serve.png (when
matplotlib is there), each server's log, and prints the tables. --write-benchmarks replaces the
section of BENCHMARKS.md between `<!-- bench-serve:LABEL:begin -->` and
`<!-- bench-serve:LABEL:end -->` (appended when missing). Exits 1 when any request failed.

`python bench_serve.py peer-server [--no-extra-bufts] -- ARGS` runs llama_cpp.server with ARGS
(the venv's python runs it); `peer-probe` checks whether llama.cpp runs with its extra buffer types
on this machine; `run` is the driver. Standard library only (the plot needs matplotlib).
"""
import argparse
import concurrent.futures
import datetime
import http.client
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 20261206
SYSTEM = "You are a helpful assistant. Answer the question using the passages."
MODES = ["sequential", "parallel", "ape", "block-attention"]
# The full run, and --quick (CI: ours alone, about a minute).
FULL = {"passages": 50, "per_request": 5, "requests": 40, "warmup": 4, "concurrency": [1, 4],
        "max_tokens": 32, "facts": 8}
QUICK = {"passages": 10, "per_request": 5, "requests": 6, "warmup": 2, "concurrency": [1, 4],
         "max_tokens": 8, "facts": 4}
# llama.cpp's context (the model's training window, SmolLM2: 8192) and batch sizes (a prompt goes
# to llama_decode in calls of up to n_batch tokens, split into micro-batches of n_ubatch, as in
# scripts/bench_cpu.py).
PEER_N_CTX, PEER_N_BATCH, PEER_N_UBATCH = 8192, 2048, 512
# Bounds: every socket read, a whole request, a server's start and its stop.
IO_TIMEOUT_S, REQUEST_TIMEOUT_S, START_TIMEOUT_S, STOP_TIMEOUT_S = 120.0, 600.0, 300.0, 20.0

# ---------------------------------------------------------------------------------------------
# The workload.

FIRST = ["Mira", "Tomas", "Elsa", "Ivo", "Lena", "Oren", "Petra", "Ravi", "Sana", "Yuri", "Aino",
         "Bram", "Cleo", "Dov", "Esme", "Finn", "Greta", "Hugo", "Ines", "Joran"]
SYLLABLES = ["kov", "dar", "vel", "mor", "tas", "lin", "bre", "quo", "zan", "fel", "rud", "oss",
             "pim", "gal", "ster", "wen", "tor", "ash", "nev", "cul"]
TOWN_END = ["hill", "by", "ford", "mere", "wick", "stead", "holm", "gate"]
ORG_ADJ = ["Lantern", "Copper", "Silver", "Hollow", "Amber", "Crooked", "Quiet", "Iron", "Velvet",
           "Northern"]
ORG_NOUN = ["Kettle", "Anchor", "Owl", "Harbor", "Mill", "Compass", "Pine", "Bell"]
ORG_KIND = ["Bakery", "Press", "Observatory", "Guild", "Theatre", "Brewery", "Library"]
JOBS = ["glassblower", "cartographer", "beekeeper", "clockmaker", "ferry pilot", "bookbinder",
        "stonemason", "lighthouse keeper", "violin maker", "archivist", "potter", "weaver",
        "sailmaker", "goldsmith"]
COLOURS = ["green", "orange", "purple", "yellow", "crimson", "teal", "grey", "violet", "indigo",
           "amber", "scarlet", "turquoise", "maroon", "olive"]
ANIMALS = ["heron", "otter", "lynx", "badger", "falcon", "hare", "goat", "raven", "fox", "crane"]
INSTRUMENTS = ["cello", "flute", "harp", "accordion", "oboe", "lute", "drum", "fiddle"]
FOODS = ["plum cake", "barley soup", "smoked trout", "honey bread", "lentil stew", "pear tart",
         "onion pie", "cherry dumplings"]
PRIZES = ["Harbour Medal", "Golden Quill", "Lantern Prize", "River Cup", "Silver Compass"]


def syllables(r):
    return "".join(r.choice(SYLLABLES) for _ in range(2 + r.randrange(2))).capitalize()


def town(r):
    return syllables(r) + r.choice(TOWN_END)


def org(r):
    return f"the {r.choice(ORG_ADJ)} {r.choice(ORG_NOUN)} {r.choice(ORG_KIND)}"


def profile(r, surname):
    """One passage: a fictional person's profile. Returns (text, [(question, answer), ...]); the
    first fact names the person in full, the others by the (distinct) surname."""
    name = f"{r.choice(FIRST)} {surname}"
    s = surname
    home, elsewhere, work = town(r), town(r), org(r)
    year, founded, won = 1850 + r.randrange(120), 1700 + r.randrange(150), 1900 + r.randrange(120)
    job, colour = r.choice(JOBS), r.choice(COLOURS)
    animal, pet = r.choice(ANIMALS), syllables(r)
    instrument, food, prize = r.choice(INSTRUMENTS), r.choice(FOODS), r.choice(PRIZES)
    street, number = syllables(r), 2 + r.randrange(97)
    facts = [
        (f"{name} was born in {year} in the town of {home}, where the river bends twice before "
         "it reaches the sea.", f"In which town was {name} born?", home),
        (f"{s} works as a {job} at {work}, which was founded in {founded} and still keeps its "
         "old wooden sign above the door.", f"What does {name} work as?", job),
        (f"The flag of {home} is {colour} with a white star in the corner, and {s} hangs one "
         "from the window every spring.", f"What colour is the flag of {name}'s home town?",
         colour),
        (f"Every summer {s} travels to {elsewhere} to visit an old friend and to walk along the "
         "cliffs there.", f"Which town does {name} visit every summer?", elsewhere),
        (f"{s} keeps a tame {animal} called {pet}, which follows {s} to work most mornings.",
         f"What animal does {name} keep?", animal),
        (f"In the evenings {s} plays the {instrument} in a small band that meets above a shop "
         "near the harbour.", f"Which instrument does {name} play?", instrument),
        (f"{s}'s favourite dish is {food}, cooked slowly the way it was made at home.",
         f"What is {name}'s favourite dish?", food),
        (f"In {won} {s} won the {prize} for work that the judges called patient and exact.",
         f"Which prize did {name} win?", prize),
        (f"{s} lives at number {number} on {street} Street, in a narrow house with a blue door.",
         f"On which street does {name} live?", f"{street} Street"),
        (f"Friends say that {s} is quiet in company but tells long stories once the fire is lit.",
         f"When does {name} tell long stories?", "once the fire is lit"),
    ]
    return facts


def workload(sizes, seed=SEED):
    """The passages and the requests: warm-up, then one list per concurrency level."""
    r = random.Random(seed)
    surnames, passages = set(), []
    while len(passages) < sizes["passages"]:
        s = syllables(r)
        if s in surnames:
            continue
        surnames.add(s)
        facts = profile(r, s)[:sizes["facts"]]
        text = " ".join(f[0] for f in facts)
        passages.append({"text": text, "qa": [(q, a) for _, q, a in facts]})

    def request():
        docs = r.sample(range(len(passages)), sizes["per_request"])
        about = r.choice(docs)
        q, a = r.choice(passages[about]["qa"])
        return {"docs": docs, "about": about, "question": q, "answer": a}

    warmup = [request() for _ in range(sizes["warmup"])]
    levels = {str(c): [request() for _ in range(sizes["requests"])]
              for c in sizes["concurrency"]}
    return {"seed": seed, "system": SYSTEM, "passages": [p["text"] for p in passages],
            "warmup": warmup, "levels": levels}


def body(side, req, passages, max_tokens, mode=None):
    """A request's JSON body for one side."""
    texts = [passages[i] for i in req["docs"]]
    out = {"model": "bench", "max_tokens": max_tokens, "temperature": 0, "top_p": 1.0,
           "seed": SEED, "stream": True, "stream_options": {"include_usage": True}}
    if side == "ours":
        out["messages"] = [{"role": "system", "content": SYSTEM},
                           {"role": "user", "content": req["question"]}]
        out["documents"] = [{"text": t} for t in texts]
        if mode:
            out["ape"] = {"mode": mode}
    else:
        out["messages"] = [{"role": "system", "content": SYSTEM},
                           {"role": "user",
                            "content": "".join(t + "\n" for t in texts)
                            + "Question: " + req["question"]}]
        # llama-cpp-python's own default is 1.1, which is not greedy decoding.
        out["repeat_penalty"] = 1.0
    return out


# ---------------------------------------------------------------------------------------------
# HTTP (standard library: http.client; every read bounded by IO_TIMEOUT_S, every request by its
# deadline).

def get(port, path, timeout=10.0):
    """GET on loopback: (status, body text); (None, error text) when the server is not there."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    except (OSError, http.client.HTTPException) as e:
        return None, f"{type(e).__name__}: {e}"
    finally:
        conn.close()


def stream_chat(port, payload, timeout=REQUEST_TIMEOUT_S):
    """One streamed chat completion, timed client-side. Returns a record (never raises)."""
    rec = {"ok": False, "error": None, "ttft_s": None, "latency_s": None, "text": "",
           "completion_tokens": None, "content_chunks": 0, "usage": None, "finish_reason": None}
    data = json.dumps(payload).encode()
    start = time.perf_counter()
    deadline = start + timeout
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=IO_TIMEOUT_S)
    try:
        conn.request("POST", "/v1/chat/completions", body=data,
                     headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        resp = conn.getresponse()
        if resp.status != 200:
            rec["error"] = f"HTTP {resp.status}: {resp.read(2000).decode(errors='replace')}"
            return rec
        parts, done = [], False
        while True:
            if time.perf_counter() > deadline:
                rec["error"] = f"timed out after {timeout:.0f} s"
                return rec
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, ": ping" comments, event names
            item = line[5:].strip()
            if item == b"[DONE]":
                done = True
                break
            chunk = json.loads(item)
            if "error" in chunk:
                rec["error"] = f"error in stream: {json.dumps(chunk['error'])[:500]}"
                return rec
            if chunk.get("usage"):
                rec["usage"] = chunk["usage"]
            for choice in chunk.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    if rec["ttft_s"] is None:
                        rec["ttft_s"] = time.perf_counter() - start
                    rec["content_chunks"] += 1
                    parts.append(content)
                if choice.get("finish_reason"):
                    rec["finish_reason"] = choice["finish_reason"]
        rec["latency_s"] = time.perf_counter() - start
        rec["text"] = "".join(parts)
        if not done:
            rec["error"] = "the stream ended without data: [DONE]"
            return rec
        usage = rec["usage"] or {}
        rec["completion_tokens"] = usage.get("completion_tokens", rec["content_chunks"])
        if rec["ttft_s"] is None:  # no content at all: the first token is the end
            rec["ttft_s"] = rec["latency_s"]
        rec["ok"] = True
        return rec
    except (OSError, http.client.HTTPException, ValueError) as e:
        rec["error"] = f"{type(e).__name__}: {e}"
        return rec
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# Servers.

def free_port():
    """A free loopback port (bound and released: the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess in its own process group, its output in a log file."""
    live = []

    def __init__(self, name, cmd, port, ready_path, log_path, env):
        self.name, self.cmd, self.port, self.ready_path = name, cmd, port, ready_path
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.log.write(("$ " + " ".join(cmd) + "\n").encode())
        self.log.flush()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        Server.live.append(self)

    def tail(self, n=25):
        try:
            return "".join(open(self.log_path, errors="replace").readlines()[-n:])
        except OSError:
            return ""

    def wait_ready(self, timeout=START_TIMEOUT_S):
        """Polls the ready path until it answers 200; fails if the process exits first."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode} "
                                   f"before it was ready; its log ({self.log_path}) ends:\n"
                                   + self.tail())
            status, _ = get(self.port, self.ready_path, timeout=5.0)
            if status == 200:
                return time.monotonic() - start
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} was not ready after {timeout:.0f} s; its log "
                           f"({self.log_path}) ends:\n" + self.tail())

    def stop(self):
        """SIGTERM to the process group, then SIGKILL after STOP_TIMEOUT_S."""
        if self in Server.live:
            Server.live.remove(self)
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                print(f"{self.name} did not stop on SIGTERM within {STOP_TIMEOUT_S:.0f} s: "
                      "killing it", file=sys.stderr)
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        self.log.close()

    @classmethod
    def stop_all(cls):
        for s in list(cls.live):
            s.stop()


def probe_peer(peer_python, model, threads, log_path, env):
    """llama.cpp's flags for this machine: [] or ["--no-extra-bufts"] when a short prompt with
    its extra buffer types crashes (its AMX matmul faults on machines that report AMX but do not
    let a process use it, as this build machine does: see scripts/bench_cpu.py)."""
    cmd = [peer_python, os.path.abspath(__file__), "peer-probe", "--model", model,
           "--threads", str(threads)]
    with open(log_path, "ab") as log:
        try:
            ok = subprocess.run(cmd, stdout=log, stderr=log, env=env,
                                timeout=START_TIMEOUT_S).returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
        if ok:
            return []
        print("llama.cpp crashed on a short prompt with its extra buffer types (AMX, repacked "
              "weights): its server runs with use_extra_bufts=False", file=sys.stderr)
        subprocess.run(cmd + ["--no-extra-bufts"], check=True, stdout=log, stderr=log, env=env,
                       timeout=START_TIMEOUT_S)
    return ["--no-extra-bufts"]


def peer_args(model, threads, port):
    """llama_cpp.server's arguments (the settings the report lists)."""
    return ["--model", model, "--host", "127.0.0.1", "--port", str(port),
            "--n_threads", str(threads), "--n_threads_batch", str(threads),
            "--n_ctx", str(PEER_N_CTX), "--n_batch", str(PEER_N_BATCH),
            "--n_ubatch", str(PEER_N_UBATCH),
            "--cache", "true", "--cache_type", "ram",
            "--interrupt_requests", "false",
            "--logits_all", "false",
            "--verbose", "false"]


# ---------------------------------------------------------------------------------------------
# Running the workload.

def run_level(side, port, reqs, passages, max_tokens, concurrency, mode=None, tag=""):
    """Sends `reqs` with `concurrency` clients; returns (records in request order, wall s)."""
    records = [None] * len(reqs)
    lock = threading.Lock()
    done = [0]

    def one(i):
        rec = stream_chat(port, body(side, reqs[i], passages, max_tokens, mode))
        rec["index"] = i
        served = ((rec["usage"] or {}).get("ape") or {}).get("mode") if rec["ok"] else None
        if mode and served and served != mode:
            rec["ok"] = False
            rec["error"] = f"asked for mode {mode}, the usage says {served}"
        records[i] = rec
        with lock:
            done[0] += 1
            if not rec["ok"]:
                print(f"  {tag} request {i}: {rec['error']}", file=sys.stderr)
        return rec

    start = time.perf_counter()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=concurrency)
    try:
        list(pool.map(one, range(len(reqs))))
    finally:
        # On an interrupt, do not wait for the requests in flight: the caller stops the server,
        # which ends them.
        pool.shutdown(wait=False, cancel_futures=True)
    return records, time.perf_counter() - start


def pct(xs, p):
    """The p-th percentile by nearest rank (p95 of 40 values: the 38th smallest)."""
    xs = sorted(xs)
    if not xs:
        return None
    return xs[max(0, math.ceil(p / 100 * len(xs)) - 1)]


def summarize(records, wall):
    """A level's figures."""
    ok = [r for r in records if r["ok"]]
    ttft = [r["ttft_s"] for r in ok]
    lat = [r["latency_s"] for r in ok]
    tokens = sum(r["completion_tokens"] or 0 for r in ok)
    out = {"requests": len(records), "errors": len(records) - len(ok), "wall_s": wall,
           "ttft_median_ms": ttft and statistics.median(ttft) * 1e3,
           "ttft_p95_ms": ttft and pct(ttft, 95) * 1e3,
           "latency_median_s": lat and statistics.median(lat),
           "latency_p95_s": lat and pct(lat, 95),
           "completion_tokens": tokens, "tokens_per_s": tokens / wall if wall > 0 else None,
           "usage_reported": sum(1 for r in ok if r["usage"]),
           "empty_answers": sum(1 for r in ok if not r["text"].strip())}
    prompt = [r["usage"]["prompt_tokens"] for r in ok
              if r["usage"] and r["usage"].get("prompt_tokens") is not None]
    out["prompt_tokens_mean"] = prompt and statistics.mean(prompt)
    ape = [r["usage"]["ape"] for r in ok if r["usage"] and isinstance(r["usage"].get("ape"), dict)]
    if ape:
        enc = [a.get("tokens_encoded") for a in ape if a.get("tokens_encoded") is not None]
        out["tokens_encoded_mean"] = enc and statistics.mean(enc)
        docs = {}
        for a in ape:
            for tier, n in (a.get("documents") or {}).items():
                docs[tier] = docs.get(tier, 0) + (n or 0)
        out["documents"] = docs
        server_ttft = [a["time_to_first_token_ms"] for a in ape
                       if a.get("time_to_first_token_ms") is not None]
        out["server_ttft_median_ms"] = server_ttft and statistics.median(server_ttft)
    return out


def run_side(side, server, wl, sizes, modes, results):
    """Warm-up, each concurrency level, then (ours) each mode at concurrency 1."""
    passages, mt = wl["passages"], sizes["max_tokens"]
    t = time.perf_counter()
    warm, _ = run_level(side, server.port, wl["warmup"], passages, mt, 1, tag=f"{side} warm-up")
    results["warmup_errors"] = sum(1 for r in warm if not r["ok"])
    print(f"{side}: warm-up, {len(warm)} requests, {time.perf_counter() - t:.1f} s",
          file=sys.stderr)
    results["levels"] = {}
    for c in sizes["concurrency"]:
        load = os.getloadavg()[0]
        recs, wall = run_level(side, server.port, wl["levels"][str(c)], passages, mt, c,
                               tag=f"{side} c={c}")
        s = summarize(recs, wall)
        s["loadavg_at_start"] = load
        results["levels"][str(c)] = {"summary": s, "records": recs}
        print(f"{side}: concurrency {c}: {s['requests']} requests, {s['errors']} errors, "
              f"TTFT median {fmt_ms(s['ttft_median_ms'])} ms, p95 {fmt_ms(s['ttft_p95_ms'])} ms, "
              f"{fmt(s['tokens_per_s'])} tokens/s, {wall:.1f} s", file=sys.stderr)
    if modes:
        results["modes"] = {}
        reqs = wl["levels"][str(sizes["concurrency"][0])]
        for m in MODES:
            recs, wall = run_level(side, server.port, reqs, passages, mt, 1, mode=m,
                                   tag=f"{side} mode {m}")
            s = summarize(recs, wall)
            results["modes"][m] = {"summary": s, "records": recs}
            print(f"{side}: mode {m}: {s['errors']} errors, TTFT median "
                  f"{fmt_ms(s['ttft_median_ms'])} ms, {wall:.1f} s", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# The report.

def fmt(x, digits=1):
    if x is None or x == []:
        return "-"
    return f"{x:.{digits}f}" if x >= 10 else f"{x:.{digits + 1}f}"


def fmt_ms(x):
    if x is None or x == []:
        return "-"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def ratio(a, b):
    if not a or not b:
        return "-"
    r = a / b
    return f"{r:.3f}x" if r < 0.1 else f"{r:.2f}x"


def cpu_model():
    name = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {len(os.sched_getaffinity(0))} cores (nproc)"


def git_rev():
    try:
        return subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def same_answer(a, b):
    return a["ok"] and b["ok"] and a["text"].strip() == b["text"].strip()


def report(res, sizes, meta):
    """The Markdown report."""
    sides = [s for s in ("ours", "llama.cpp") if s in res["sides"]]
    lines = [
        f"{meta['date']}, {meta['cpu']}, {meta['threads']} threads on each server, one server at "
        f"a time; the load average as the run started: {meta['loadavg']}.",
        "",
        f"Model `{meta['model']}`; ours: "
        + (f"`ape serve` at `{meta['rev']}` (`{meta['bin']} serve --device cpu --mode ape "
           "--no-store`)" if "ours" in sides else "not run (--peer-only)")
        + f"; llama.cpp: {meta['peer']}.",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Workload: {sizes['passages']} generated passages (fictional people's profiles, "
        f"{sizes['facts']} facts each), each request {sizes['per_request']} of them drawn at "
        f"random in random order and a short question about one of them; {sizes['warmup']} warm-up "
        f"requests, then {sizes['requests']} requests per concurrency level (other requests at "
        f"each level, the same on both servers); greedy, at most {sizes['max_tokens']} tokens, "
        "streamed. Seed " + str(res["workload_seed"]) + "."
    ]
    pt = [res["sides"][s]["levels"][l]["summary"].get("prompt_tokens_mean")
          for s in sides for l in res["sides"][s]["levels"]]
    pt = [x for x in pt if x]
    if pt:
        lines[-1] += f" Prompt: {min(pt):.0f} to {max(pt):.0f} tokens on average per level."
    lines += [
        "",
        "| server | concurrency | requests | errors | TTFT median ms | TTFT p95 ms "
        "| latency median s | latency p95 s | output tokens/s | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in sides:
        for c in sizes["concurrency"]:
            x = res["sides"][s]["levels"][str(c)]["summary"]
            lines.append(
                f"| {s} | {c} | {x['requests']} | {x['errors']} | {fmt_ms(x['ttft_median_ms'])} "
                f"| {fmt_ms(x['ttft_p95_ms'])} | {fmt(x['latency_median_s'], 2)} "
                f"| {fmt(x['latency_p95_s'], 2)} | {fmt(x['tokens_per_s'])} | {x['wall_s']:.1f} |")
    if len(sides) == 2:
        lines += ["", "| concurrency | TTFT median, ours / llama.cpp | TTFT p95, ours / llama.cpp "
                  "| latency median, ours / llama.cpp | output tokens/s, ours / llama.cpp |",
                  "|---:|---:|---:|---:|---:|"]
        for c in sizes["concurrency"]:
            o = res["sides"]["ours"]["levels"][str(c)]["summary"]
            p = res["sides"]["llama.cpp"]["levels"][str(c)]["summary"]
            lines.append(f"| {c} | {ratio(o['ttft_median_ms'], p['ttft_median_ms'])} "
                         f"| {ratio(o['ttft_p95_ms'], p['ttft_p95_ms'])} "
                         f"| {ratio(o['latency_median_s'], p['latency_median_s'])} "
                         f"| {ratio(o['tokens_per_s'], p['tokens_per_s'])} |")
        lines += ["", "TTFT and latency: < 1 is ours faster; tokens/s: > 1 is ours faster. "
                  "The goals: TTFT median at concurrency 1 at least 10x lower (first bar "
                  "5x), higher output tokens/s at concurrency 4."]
    ours = res["sides"].get("ours")
    if ours and ours.get("modes"):
        c1 = str(sizes["concurrency"][0])
        seq = ours["modes"]["sequential"]["records"]
        n = len(seq)
        lines += ["", f"Ours, the concurrency-{c1} requests again in each mode (`ape: {{\"mode\": "
                  "...}`), one at a time:", "",
                  "| mode | errors | answer equals sequential's | TTFT median ms "
                  "| TTFT p95 ms | tokens encoded per request (mean) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for m in MODES:
            x = ours["modes"][m]
            same = sum(1 for a, b in zip(x["records"], seq) if same_answer(a, b))
            s = x["summary"]
            lines.append(f"| {m} | {s['errors']} | {same} / {n} | {fmt_ms(s['ttft_median_ms'])} "
                         f"| {fmt_ms(s['ttft_p95_ms'])} | {fmt(s.get('tokens_encoded_mean'))} |")
        timed = ours["levels"][c1]["records"]
        consistent = sum(1 for a, b in zip(ours["modes"]["ape"]["records"], timed)
                         if same_answer(a, b))
        lines += ["", f"- The timed concurrency-{c1} run (the server's default mode, ape) and "
                  f"the explicit `ape` pass gave the same answer for {consistent} of {n} "
                  "requests."]
    lines += ["", "Notes:", "",
              "- Time to first token: client-side, from sending the request to the first stream "
              "chunk with content; latency: to `data: [DONE]`; output tokens/s: completion "
              "tokens of all the level's requests over its wall time (first request sent to last "
              "stream ended). p95 by nearest rank."]
    for s in sides:
        for c in sizes["concurrency"]:
            x = res["sides"][s]["levels"][str(c)]["summary"]
            if x["requests"] - x["errors"] and x["usage_reported"] < x["requests"] - x["errors"]:
                lines.append(f"- {s}, concurrency {c}: {x['usage_reported']} of "
                             f"{x['requests'] - x['errors']} streams reported `usage`; the others' "
                             "completion tokens are their chunks with content.")
                break
    if ours:
        for c in sizes["concurrency"]:
            x = ours["levels"][str(c)]["summary"]
            if x.get("documents") is not None:
                docs = ", ".join(f"{k} {v}" for k, v in sorted(x["documents"].items()))
                lines.append(f"- Ours, concurrency {c}: {fmt(x.get('tokens_encoded_mean'))} "
                             f"tokens encoded per request on average (of "
                             f"{fmt(x.get('prompt_tokens_mean'))} prompt tokens); documents by "
                             f"where they came from: {docs}; the server's own TTFT median "
                             f"{fmt_ms(x.get('server_ttft_median_ms'))} ms.")
    loads = [f"{s} at concurrency {c} "
             f"{res['sides'][s]['levels'][str(c)]['summary']['loadavg_at_start']:.1f}"
             for s in sides for c in sizes["concurrency"]]
    lines.append(f"- The machine's 1-minute load average as each level started: "
                 f"{', '.join(loads)}, on {len(os.sched_getaffinity(0))} cores. Above the core "
                 "count other work shares "
                 "the cores and both servers slow down, llama.cpp more (its threads meet at a "
                 "spinning barrier after every graph operation; see the CPU comparison above).")
    if "llama.cpp" in sides:
        lines.append("- llama.cpp's server: " + meta["peer_settings"])
        if ours and ours.get("modes"):
            c1 = str(sizes["concurrency"][0])
            p = res["sides"]["llama.cpp"]["levels"][c1]["records"]
            seq = ours["modes"]["sequential"]["records"]
            same = sum(1 for a, b in zip(p, seq) if same_answer(a, b))
            lines.append(f"- Sanity: llama.cpp's answer equalled ours in sequential mode (the same "
                         f"full prompt) for {same} of {len(seq)} concurrency-{c1} requests "
                         "(each quantises activations its own way: close logits, not equal).")
    correct = []
    for s in sides:
        recs = res["sides"][s]["levels"][str(sizes["concurrency"][0])]["records"]
        reqs = res["workload"]["levels"][str(sizes["concurrency"][0])]
        hit = sum(1 for r, q in zip(recs, reqs)
                  if r["ok"] and q["answer"].lower() in r["text"].lower())
        correct.append(f"{s} {hit} of {len(recs)}")
    lines.append(f"- Answers containing the right fact at concurrency {sizes['concurrency'][0]} "
                 f"(a 135M model; for orientation only): {', '.join(correct)}.")
    return "\n".join(lines) + "\n"


def plot(res, sizes, path):
    """Two panels: TTFT median per concurrency (log) and output tokens/s, per server."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return False
    sides = [s for s in ("ours", "llama.cpp") if s in res["sides"]]
    levels = sizes["concurrency"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(sides)
    colours = {"ours": "tab:green", "llama.cpp": "tab:blue"}
    for k, s in enumerate(sides):
        xs = [i + (k - (len(sides) - 1) / 2) * width for i in range(len(levels))]
        summ = [res["sides"][s]["levels"][str(c)]["summary"] for c in levels]
        ttft = [x["ttft_median_ms"] or 0 for x in summ]
        p95 = [x["ttft_p95_ms"] or 0 for x in summ]
        tps = [x["tokens_per_s"] or 0 for x in summ]
        a1.bar(xs, ttft, width, label=f"{s} (median)", color=colours[s])
        a1.scatter(xs, p95, marker="_", s=300, color="black",
                   label="p95" if k == len(sides) - 1 else None)
        a2.bar(xs, tps, width, label=s, color=colours[s])
        for x, v in zip(xs, ttft):
            a1.annotate(f"{v:.0f}", (x, v), ha="center", va="bottom", fontsize=8)
        for x, v in zip(xs, tps):
            a2.annotate(f"{v:.1f}", (x, v), ha="center", va="bottom", fontsize=8)
    for ax in (a1, a2):
        ax.set_xticks(range(len(levels)))
        ax.set_xticklabels([f"concurrency {c}" for c in levels])
        ax.legend(fontsize=8)
    a1.set_yscale("log")
    a1.set_ylabel("time to first token, ms (log)")
    a1.set_title("Time to first token (lower is better)")
    a2.set_ylabel("output tokens/s, all requests")
    a2.set_title("Throughput (higher is better)")
    fig.suptitle(f"RAG serving: {sizes['per_request']} of {sizes['passages']} passages per "
                 f"request, {sizes['requests']} requests per level")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_benchmarks(label, text, out_dir, has_plot):
    """Replaces (or appends) BENCHMARKS.md's section for `label` between its markers."""
    path = os.path.join(ROOT, "BENCHMARKS.md")
    begin, end = f"<!-- bench-serve:{label}:begin -->", f"<!-- bench-serve:{label}:end -->"
    rel = os.path.relpath(out_dir, ROOT)
    sect = [begin, f"### RAG serving: `ape serve` against llama.cpp's server ({label})", "",
            "Written by `scripts/bench-serve.sh --write-benchmarks`; every request in "
            f"`{rel}/results.json`.", "", text.rstrip("\n")]
    if has_plot:
        sect += ["", f"![time to first token and throughput]({rel}/serve.png)"]
    sect.append(end)
    body_text = open(path).read()
    if begin in body_text and end in body_text:
        head, rest = body_text.split(begin, 1)
        body_text = head + "\n".join(sect) + rest.split(end, 1)[1]
    else:
        body_text = body_text.rstrip("\n") + "\n\n" + "\n".join(sect) + "\n"
    open(path, "w").write(body_text)
    print(f"updated {path} (section {label})", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# The driver.

def driver(a):
    sizes = dict(QUICK if a.quick else FULL)
    for k in ("passages", "requests", "warmup", "max_tokens", "per_request"):
        v = getattr(a, k)
        if v is not None:
            sizes[k] = v
    if a.concurrency:
        try:
            sizes["concurrency"] = [int(x) for x in a.concurrency.split(",")]
        except ValueError:
            sys.exit(f"--concurrency takes comma-separated counts, not {a.concurrency!r}")
    if min(sizes["concurrency"]) < 1 or min(sizes[k] for k in ("passages", "requests",
                                                                "max_tokens", "per_request")) < 1:
        sys.exit("--concurrency, --passages, --requests, --max-tokens and --per-request must be "
                 "at least 1")
    if sizes["per_request"] > sizes["passages"]:
        sys.exit(f"--per-request {sizes['per_request']} exceeds --passages {sizes['passages']}")
    if a.threads < 1:
        sys.exit("--threads must be at least 1")
    if not os.path.isfile(a.model):
        sys.exit(f"bench-serve: model {a.model} not found (scripts/fetch-model.sh fetches the "
                 "default one)")
    if not a.peer_only and not (os.path.isfile(a.bin) and os.access(a.bin, os.X_OK)):
        sys.exit(f"bench-serve: {a.bin} is not an executable (build it with: cargo build "
                 "--release -p ape-llama --bin ape)")
    run_peer = not a.ours_only
    if run_peer and not a.peer_python:
        sys.exit("--peer-python is needed unless --ours-only")
    scratch = os.path.join(ROOT, "target", "bench-serve-runs")
    out = a.out or os.path.join(scratch if a.quick else os.path.join(ROOT, "bench-results",
                                                                      "serve"), a.label)
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    rev = git_rev()
    loadavg = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    wl = workload(sizes)
    json.dump(wl, open(os.path.join(out, "workload.json"), "w"), indent=1)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), RAYON_NUM_THREADS=str(a.threads),
               MATMUL_NUM_THREADS=str(a.threads))
    res = {"workload_seed": wl["seed"], "workload": wl, "sides": {}}
    peer_version, peer_flags, peer_settings = "not run (--ours-only)", [], ""
    started = time.time()
    start_date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    def on_signal(signum, _frame):
        raise SystemExit(f"bench-serve: stopped by signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    try:
        if not a.peer_only:
            port = free_port()
            cmd = [a.bin, "serve", "--model", a.model, "--device", "cpu",
                   "--addr", f"127.0.0.1:{port}", "--threads", str(a.threads), "--mode", "ape",
                   "--no-store"]
            srv = Server("ape serve", cmd, port, "/health", os.path.join(out, "ours.log"), env)
            try:
                ready = srv.wait_ready()
                print(f"ape serve ready on port {port} after {ready:.1f} s", file=sys.stderr)
                side = res["sides"].setdefault("ours", {"ready_s": ready, "checks": {}})
                for path in ("/v1/models", "/metrics"):
                    status, text = get(port, path)
                    side["checks"][path] = status
                    if path == "/metrics" and status == 200:
                        open(os.path.join(out, "ours-metrics-before.txt"), "w").write(text)
                run_side("ours", srv, wl, sizes, not a.no_modes, side)
                status, text = get(port, "/metrics")
                side["checks"]["/metrics (after)"] = status
                if status == 200:
                    open(os.path.join(out, "ours-metrics.txt"), "w").write(text)
            finally:
                srv.stop()
        if run_peer:
            peer_version = subprocess.run(
                [a.peer_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                capture_output=True, text=True, check=True, timeout=60).stdout.strip()
            peer_flags = probe_peer(a.peer_python, a.model, a.threads,
                                    os.path.join(out, "peer.log"), env)
            port = free_port()
            args = peer_args(a.model, a.threads, port)
            cmd = ([a.peer_python, os.path.abspath(__file__), "peer-server"] + peer_flags
                   + ["--"] + args)
            peer_settings = (
                "`python -m llama_cpp.server " + " ".join(args[4:]) + "` (host and port aside): "
                "the prompt cache on (`--cache true`, in RAM, 2 GiB), every request served to the "
                "end (`--interrupt_requests false`; by default a new request ends the running "
                "stream), logits of the last row only (`--logits_all false`; the server's "
                "default keeps every row's logits for logprobs, which this workload does not "
                "ask for), the chat template from the GGUF (ChatML), requests with "
                "`repeat_penalty: 1.0` (its default 1.1 is not greedy). It serves one request at "
                "a time; the others wait.")
            if peer_flags:
                peer_settings += (" Run with `use_extra_bufts=False` (its AMX matmul crashes on "
                                  "this machine: no AMX, no repacked weights).")
            srv = Server("llama.cpp server", cmd, port, "/v1/models",
                         os.path.join(out, "peer.log"), env)
            try:
                ready = srv.wait_ready()
                print(f"llama.cpp server ready on port {port} after {ready:.1f} s",
                      file=sys.stderr)
                side = res["sides"].setdefault("llama.cpp", {"ready_s": ready, "checks": {}})
                run_side("llama.cpp", srv, wl, sizes, False, side)
            finally:
                srv.stop()
    finally:
        Server.stop_all()
    meta = {"date": start_date,
            "cpu": cpu_model(), "threads": a.threads, "model": os.path.basename(a.model),
            "rev": rev, "bin": a.bin or "-",
            "peer": (f"llama-cpp-python {peer_version} (`llama_cpp.server`, llama.cpp built from "
                     "source by pip)" if run_peer else peer_version),
            "peer_settings": peer_settings, "peer_flags": peer_flags, "loadavg": loadavg,
            "command": a.command or " ".join(sys.argv)}
    text = report(res, sizes, meta)
    elapsed = time.time() - started
    text += f"\nThe run took {elapsed:.0f} s in all (server starts included).\n"
    errors = sum(x["summary"]["errors"] for s in res["sides"].values()
                 for part in ("levels", "modes") for x in (s.get(part) or {}).values())
    errors += sum(s.get("warmup_errors", 0) for s in res["sides"].values())
    bad_checks = [f"{name} {path}: {st}" for name, s in res["sides"].items()
                  for path, st in s.get("checks", {}).items() if st != 200]
    open(os.path.join(out, "results.md"), "w").write(text)
    json.dump({"meta": meta, "sizes": sizes, "results": res},
              open(os.path.join(out, "results.json"), "w"), indent=1)
    has_plot = plot(res, sizes, os.path.join(out, "serve.png"))
    print(text)
    print(f"results in {out}", file=sys.stderr)
    if a.write_benchmarks:
        write_benchmarks(a.label, text, out, has_plot)
    if errors or bad_checks:
        sys.exit(f"bench-serve: {errors} request(s) failed"
                 + (f"; endpoints not answering 200: {', '.join(bad_checks)}" if bad_checks
                    else "") + f" (see {out})")


def peer_probe(a):
    """llama.cpp on a short prompt (crashes when its extra buffer types fault)."""
    import llama_cpp
    if a.no_extra_bufts:
        patch_extra_bufts()
    llm = llama_cpp.Llama(model_path=a.model, n_ctx=64, n_threads=a.threads,
                          n_threads_batch=a.threads, verbose=False)
    llm.eval(llm.tokenize(b"The quick brown fox jumps over the lazy dog."))
    print("llama.cpp probe ok")


def patch_extra_bufts():
    """llama_model_params.use_extra_bufts = False for every model loaded in this process (the
    binding has no argument for it; its constructor starts from llama_model_default_params)."""
    import llama_cpp
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def without_extra_bufts():
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = without_extra_bufts


def peer_server(a, rest):
    """llama_cpp.server with `rest` as its command line."""
    if a.no_extra_bufts:
        patch_extra_bufts()
    from llama_cpp.server.__main__ import main as server_main
    sys.argv = ["llama_cpp.server"] + rest
    server_main()


def main():
    argv = sys.argv[1:]
    rest = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="the benchmark (scripts/bench-serve.sh runs this)")
    r.add_argument("--model", required=True, help="the GGUF file both servers load")
    r.add_argument("--bin", default="", help="the ape program (its `serve` command)")
    r.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    r.add_argument("--quick", action="store_true", help="small sizes (CI: with --ours-only)")
    r.add_argument("--ours-only", action="store_true", help="ape serve only, no llama.cpp")
    r.add_argument("--peer-only", action="store_true", help="llama.cpp only (for debugging)")
    r.add_argument("--no-modes", action="store_true", help="skip ours' per-mode pass")
    r.add_argument("--passages", type=int, help="passages in the pool (default 50)")
    r.add_argument("--per-request", type=int, help="passages per request (default 5)")
    r.add_argument("--requests", type=int, help="requests per concurrency level (default 40)")
    r.add_argument("--warmup", type=int, help="warm-up requests (default 4)")
    r.add_argument("--concurrency", help="levels, comma-separated (default 1,4)")
    r.add_argument("--max-tokens", type=int, help="max_tokens per request (default 32)")
    r.add_argument("--peer-python", help="the python of the venv holding llama_cpp[server]")
    r.add_argument("--label", default="latest")
    r.add_argument("--out", help="results folder (default bench-results/serve/LABEL; "
                   "target/bench-serve-runs/LABEL with --quick)")
    r.add_argument("--write-benchmarks", action="store_true")
    r.add_argument("--command", help="the command line to record in the report")
    for name in ("peer-probe", "peer-server"):
        q = sub.add_parser(name)
        q.add_argument("--no-extra-bufts", action="store_true")
        if name == "peer-probe":
            q.add_argument("--model", required=True)
            q.add_argument("--threads", type=int, required=True)
    a = p.parse_args(argv)
    if a.cmd == "run":
        if a.ours_only and a.peer_only:
            sys.exit("--ours-only and --peer-only exclude each other")
        try:
            driver(a)
        except (RuntimeError, subprocess.SubprocessError) as e:
            sys.exit(f"bench-serve: {e}")
        except KeyboardInterrupt:
            sys.exit("bench-serve: interrupted (servers stopped)")
    elif a.cmd == "peer-probe":
        peer_probe(a)
    else:
        peer_server(a, rest)


if __name__ == "__main__":
    main()
