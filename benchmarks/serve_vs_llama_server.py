"""`edge-tune serve` against llama.cpp's own `llama-server`, same base, same two adapters.

    pip install 'edge-tune[bench]'   # xllamacpp: llama-server in-process (benchmark only)
    python benchmarks/serve_vs_llama_server.py [--rounds 2] [--clients 8] [--requests 48]

Both servers load the embedded default model (SmolLM2-135M Q4_1) and the two adapters the
server tests use (tests/helpers/serve_helpers.py: a pirate adapter trained for 8 steps, and the same
adapter with its alpha negated). llama-server runs with ``--parallel CLIENTS`` slots (its
continuous batching) and picks the adapter per request with its ``lora`` field; edge-tune
runs with ``--parallel CLIENTS`` and picks it with ``model``. Both give each sequence 1024
tokens of context. Each server runs in its own process with the same thread count.

Per round and side: CLIENTS concurrent clients send REQUESTS greedy chat requests cycling
base / a / b over four prompts, ``max_tokens`` tokens each, streamed; then one conversation of
six turns (on adapter a) alone, whose turn-6 time to first token shows prompt caching. Sides
alternate within each round (the machine is shared, its speed drifts) and medians over rounds
are printed: aggregate completion tokens/s, median request latency, turn-6 time to first
token, and the prompt/adapter pairs whose greedy answer was not the same every time it was
asked (within the run, over all rounds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the tests.helpers package

MODELS = ["base", "a", "b"]
CONVERSATION = ["What is the capital of France?", "And of Italy?", "Which one is older?",
                "Name a famous building there.", "Who built it?", "Summarise in one line."]

_LLAMA_SERVER = """
import sys, time, xllamacpp as x
model, a, b, port, threads, parallel = sys.argv[1:7]
p = x.CommonParams()
p.model.path = model
p.n_parallel = int(parallel)
p.n_ctx = 1024 * int(parallel)
p.port = int(port)
p.hostnames = ["127.0.0.1"]
p.cpuparams.n_threads = int(threads)
p.cpuparams_batch.n_threads = int(threads)
p.lora_init_without_apply = True
loras = []
for path in (a, b):
    info = x.CommonAdapterLoraInfo()
    info.path = path
    info.scale = 0.0
    loras.append(info)
p.lora_adapters = loras
server = x.Server(p)
print("ready", server.listening_address, flush=True)
while True:
    time.sleep(3600)
"""


def _post_stream(url: str, body: dict, timeout: float = 600) -> tuple[str, float, float, int]:
    """One streamed chat completion: (text, time to first token, total time, tokens)."""
    req = urllib.request.Request(url, data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first, text, tokens = None, [], 0
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece:
                    first = first or time.perf_counter() - t0
                    text.append(piece)
                    tokens += 1  # one content chunk per token on both servers
    return "".join(text), first or 0.0, time.perf_counter() - t0, tokens


class Side:
    """A server under test: how to start it and how a request names its adapter."""

    name = ""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def body(self, model: str, messages: list, max_tokens: int) -> dict:
        raise NotImplementedError

    def counters(self) -> str:
        """What the server says about its decoding, for the round's line."""
        return ""

    @property
    def url(self) -> str:
        return self.base_url + "/v1/chat/completions"


class EdgeTune(Side):
    name = "edge-tune serve"

    def __init__(self, adapters: dict, threads: int, max_queue: int, parallel: int,
                 speculative: str = "auto") -> None:
        self.args = ["--adapter", f"a={adapters['a']}", "--adapter", f"b={adapters['b']}",
                     "--threads", str(threads), "--max-queue", str(max_queue),
                     "--parallel", str(parallel), "--ctx", "1024",
                     "--speculative", speculative]

    def start(self) -> None:
        from tests.helpers.serve_helpers import Server

        self.server = Server(*self.args)
        self.server.wait_ready()
        self.base_url = self.server.url

    def stop(self) -> None:
        self.server.stop()

    def body(self, model, messages, max_tokens):
        return {"model": model, "messages": messages, "temperature": 0,
                "max_tokens": max_tokens}

    def counters(self) -> str:
        h = self.server.health()
        return (f"  [{h['decode_steps']} steps, {h['decode_rows']} rows of which "
                f"{h['filler_rows']} fillers, {h['adapter_switches']} adapter switches]")


class LlamaServer(Side):
    name = "llama-server"

    def __init__(self, base: Path, adapters: dict, threads: int, parallel: int) -> None:
        self.argv = [str(base), str(adapters["a"]), str(adapters["b"]), "0", str(threads),
                     str(parallel)]

    def start(self) -> None:
        from tests.helpers.serve_helpers import free_port

        self.argv[3] = str(free_port())
        self.proc = subprocess.Popen([sys.executable, "-c", _LLAMA_SERVER, *self.argv],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("ready"):
            raise SystemExit(f"llama-server did not start: {line!r}")
        self.base_url = f"http://127.0.0.1:{self.argv[3]}"
        end = time.monotonic() + 300
        while time.monotonic() < end:
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise SystemExit("llama-server did not become healthy")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def body(self, model, messages, max_tokens):
        scales = {"base": (0.0, 0.0), "a": (1.0, 0.0), "b": (0.0, 1.0)}[model]
        return {"model": "x", "messages": messages, "temperature": 0, "max_tokens": max_tokens,
                "lora": [{"id": i, "scale": s} for i, s in enumerate(scales)]}


def run_round(side: Side, prompts: list, requests: int, clients: int, max_tokens: int,
              answers: dict) -> dict:
    jobs = [(MODELS[i % 3], prompts[(i // 3) % len(prompts)]) for i in range(requests)]

    def one(job):
        model, prompt = job
        msgs = [{"role": "user", "content": prompt}]
        text, _, total, tokens = _post_stream(side.url, side.body(model, msgs, max_tokens))
        return job, text, total, tokens

    _post_stream(side.url, side.body("a", [{"role": "user", "content": "hi"}], 4))  # warm
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, jobs))
    wall = time.perf_counter() - t0
    counters = side.counters()
    for job, text, _, _ in results:
        answers.setdefault(job, set()).add(text)
    history: list = []
    ttft = 0.0
    for question in CONVERSATION:
        history.append({"role": "user", "content": question})
        text, ttft, _, _ = _post_stream(side.url, side.body("a", history, max_tokens))
        history.append({"role": "assistant", "content": text})
    return {"tok/s": sum(r[3] for r in results) / wall,
            "latency": statistics.median(r[2] for r in results), "ttft6": ttft,
            "counters": counters}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speculative", default="auto", choices=["auto", "ngram", "off"],
                    help="edge-tune serve's --speculative (default: its default, auto)")
    args = ap.parse_args(argv)

    from tests.helpers.serve_helpers import PROMPTS, trained_adapters

    from edge_tune import models

    fixtures = trained_adapters()
    adapters = {"a": fixtures["pirate"] / "adapter.gguf", "b": fixtures["anti"]}
    base = models.default_gguf()
    sides = [EdgeTune(adapters, args.threads, max(64, args.requests), args.clients,
                      args.speculative),
             LlamaServer(base, adapters, args.threads, args.clients)]
    stats: dict = {s.name: [] for s in sides}
    answers: dict = {s.name: {} for s in sides}
    print(f"{base.name}, adapters a={adapters['a'].name} b={adapters['b'].name}; "
          f"{args.clients} clients, {args.requests} greedy requests x {args.max_tokens} "
          f"tokens, {args.threads} threads, {args.rounds} interleaved rounds")
    for r in range(args.rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            side.start()
            try:
                got = run_round(side, PROMPTS, args.requests, args.clients, args.max_tokens,
                                answers[side.name])
            finally:
                side.stop()
            stats[side.name].append(got)
            print(f"  round {r + 1} {side.name:16s} {got['tok/s']:6.1f} tok/s  median "
                  f"latency {got['latency']:.2f} s  turn-6 TTFT {got['ttft6']:.3f} s"
                  f"{got.pop('counters')}",
                  flush=True)
    print(f"\n| | {' | '.join(s.name for s in sides)} |\n|---|---|---|")
    med = {name: {k: statistics.median(x[k] for x in runs) for k in runs[0]}
           for name, runs in stats.items()}
    rows = [("aggregate completion tokens/s", "tok/s", "{:.0f}"),
            ("median latency (s)", "latency", "{:.2f}"),
            ("time to first token, turn 6 (s)", "ttft6", "{:.3f}")]
    for label, key, fmt in rows:
        print(f"| {label} | " + " | ".join(fmt.format(med[s.name][key]) for s in sides) + " |")
    changed = {s.name: sum(len(v) > 1 for v in answers[s.name].values()) for s in sides}
    pairs = len(answers[sides[0].name])
    print("| greedy prompt/adapter pairs whose answer changed | " +
          " | ".join(f"{changed[s.name]} of {pairs}" for s in sides) + " |")


if __name__ == "__main__":
    main()
