"""The official `openai` Python client against `ape serve`: what an application written for
OpenAI's API does, unchanged but for the base URL, plus the `documents` and `ape` fields sent
through the client's `extra_body`.

Usage: python scripts/serve_openai_client.py APE_BINARY MODEL_GGUF

Starts the server on a free loopback port (CPU, memory-only store), runs the checks, stops it
with SIGTERM and fails on any difference. Run by scripts/test.sh with the client installed by
scripts/install-openai.sh.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import openai

PASSAGES = [
    "The Lantern Bakery was founded by Mira Kovac in 1987 in the river town of Esterhill.",
    "Esterhill is a small town on the river Vel, known for its stone bridges and its autumn fair.",
    "In 2004 the bakery opened a second shop in Marrow Bay, run by Tomas Kovac, Mira's nephew.",
]


def start(binary, model):
    proc = subprocess.Popen(
        [binary, "serve", "--device", "cpu", "--addr", "127.0.0.1:0", "--no-store",
         "--model", model, "--api-key", "test-key"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    log = []
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        log.append(line)
        if "listening on " in line:
            base = line.split("listening on ")[1].split()[0]
            # Keep reading stderr so the server never blocks on a full pipe.
            threading.Thread(target=lambda: [log.append(x) for x in proc.stderr],
                             daemon=True).start()
            return proc, base, log
    proc.kill()
    sys.exit("ape serve did not start:\n" + "".join(log))


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"ok: {what}")


def main():
    binary, model = sys.argv[1], sys.argv[2]
    proc, base, log = start(binary, model)
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="test-key", max_retries=0,
                               timeout=120)
        models = client.models.list()
        check(len(models.data) == 1 and models.data[0].object == "model", "models.list()")

        extra = {"documents": [{"text": p} for p in PASSAGES], "ape": {"mode": "ape"}}
        messages = [{"role": "user", "content": "Who founded the Lantern Bakery?"}]
        reply = client.chat.completions.create(
            model="anything", messages=messages, max_tokens=24, temperature=0, extra_body=extra)
        text = reply.choices[0].message.content
        check(bool(text) and reply.choices[0].finish_reason in ("stop", "length"),
              f"chat.completions.create: {text!r}")
        check(reply.usage.prompt_tokens > 40 and reply.usage.completion_tokens >= 1,
              f"usage: {reply.usage.prompt_tokens} prompt, {reply.usage.completion_tokens} completion")
        ape = reply.usage.model_extra["ape"]
        check(ape["documents"]["encoded"] == 3,
              f"usage.ape: {ape}")

        stream = client.chat.completions.create(
            model="anything", messages=messages, max_tokens=24, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body=extra)
        pieces, usage, finish = [], None, None
        for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                usage = chunk.usage
        check("".join(pieces) == text, "the streamed text is the reply's")
        check(finish == reply.choices[0].finish_reason, f"finish_reason {finish}")
        check(usage is not None and usage.model_extra["ape"]["documents"]["memory"] == 3,
              "the stream's usage: the three documents read from memory")

        try:
            client.chat.completions.create(
                model="anything", messages=messages, max_tokens=4,
                extra_body={"ape": {"mode": "ape", "temperature": -1}})
            check(False, "a negative T is refused")
        except openai.BadRequestError as e:
            check(e.status_code == 400 and "ape.temperature" in str(e),
                  "openai.BadRequestError for a negative T")

        try:
            openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
            check(False, "a wrong key is refused")
        except openai.AuthenticationError as e:
            check(e.status_code == 401, "openai.AuthenticationError for a wrong key")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "killed"
    check(code == 0, f"the server stopped cleanly on SIGTERM (exit {code})")
    print(f"openai {openai.__version__}: all checks passed against {base}")


if __name__ == "__main__":
    main()
