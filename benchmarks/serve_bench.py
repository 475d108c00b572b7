"""Serving benchmarks: what one-base-many-adapters buys, measured against the alternatives.

    python benchmarks/serve_bench.py --run RUN [--rounds 5] [--tokens 48] [--parts switch,decode,peft]

RUN is an edge-tune run directory (adapter.gguf + adapter/ + manifest.json); its base is the
model every side uses. Three comparisons, each printed as a ratio against its anchor:

* ``switch``: switching the active adapter in the loaded base (edge-tune's server:
  ``llama_set_adapters_lora`` + context reset) against what llama-cpp-python's own server
  does when a request names another alias: load the base again with the adapter. Both as the
  bare operation and as "operation + a 1-token answer" (what the next request waits for).
* ``decode``: greedy decode tokens/s of the base alone, of base + the adapter unmerged
  (runtime LoRA, as the server runs it), and of the adapter merged into the base
  (``edge-tune export --merge``, quantized back to the base's own type so size is equal).
* ``peft``: the same adapter generating through edge-tune's llama.cpp path against
  transformers + PEFT on the CPU (the dequantized base in fp32, ``model.generate`` greedy).

The machine is shared and noisy: sides are interleaved round by round and medians reported.
Decode tokens/s counts the tokens after the first (prefill excluded) over the time between the
first and the last token; the prompt is a counting sequence so no side stops early at EOS.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "1, 2, 3, 4, 5,"
THREADS: int | None = None  # --threads: llama.cpp and torch alike


def _decode_rate(engine, tokens: int) -> float:
    stamps = []
    for piece in engine.generate(prompt=PROMPT, temperature=0, max_tokens=tokens):
        if piece.text:
            stamps.append(time.perf_counter())
    last = piece.completion_tokens
    return (last - 1) / (stamps[-1] - stamps[0])


def _answer_one_token(engine) -> None:
    list(engine.generate(prompt=PROMPT, temperature=0, max_tokens=1))


def bench_switch(base: Path, adapter: Path, rounds: int) -> dict:
    from edge_tune.llama.engine import Engine

    engine = Engine(base, threads=THREADS)
    engine.add_adapter(adapter, "a")
    engine.add_adapter(adapter, "b")  # a second handle on the same file: a real switch
    switch, switch_req, reload, reload_req = [], [], [], []
    for i in range(rounds):
        t = time.perf_counter()
        engine.activate("a" if i % 2 else "b")
        switch.append(time.perf_counter() - t)
        t = time.perf_counter()
        engine.activate("b" if i % 2 else "a")
        _answer_one_token(engine)
        switch_req.append(time.perf_counter() - t)

        t = time.perf_counter()
        fresh = Engine(base, threads=THREADS)
        fresh.add_adapter(adapter, "a")
        fresh.activate("a")
        reload.append(time.perf_counter() - t)
        _answer_one_token(fresh)
        reload_req.append(time.perf_counter() - t)
        fresh.close()
    engine.close()
    med = {k: statistics.median(v) for k, v in
           {"switch": switch, "switch+1tok": switch_req, "reload": reload,
            "reload+1tok": reload_req}.items()}
    print(f"adapter switch: {med['switch'] * 1e3:.2f} ms   reload base+adapter: "
          f"{med['reload'] * 1e3:.0f} ms   -> switch is {med['reload'] / med['switch']:.0f}x "
          "faster")
    print(f"next request (1 token): after switch {med['switch+1tok'] * 1e3:.0f} ms, after "
          f"reload {med['reload+1tok'] * 1e3:.0f} ms   -> "
          f"{med['reload+1tok'] / med['switch+1tok']:.1f}x")
    return med


def _merged_model(run: Path, base: Path, work: Path) -> Path | None:
    from edge_tune.converters.formats.base_info import open_gguf

    from edge_tune import api

    try:
        ftype = int(open_gguf(base).fields["general.file_type"].contents())
        quant = {3: "Q4_1", 2: "Q4_0", 7: "Q8_0", 1: "F16", 0: "F32"}.get(ftype, "Q8_0")
        result = api.export(run, base=base, out=work / "merged.gguf", merge=True, quant=quant)
        return result.path
    except TypeError as exc:  # export without merge= (issue 6 not there yet)
        print(f"merged: skipped ({exc})")
        return None


def bench_decode(run: Path, base: Path, adapter: Path, rounds: int, tokens: int) -> dict:
    from edge_tune.llama.engine import Engine

    with tempfile.TemporaryDirectory() as work:
        merged = _merged_model(run, base, Path(work))
        plain = Engine(base, threads=THREADS)
        lora = Engine(base, threads=THREADS)
        lora.add_adapter(adapter, "a")
        lora.activate("a")
        sides = {"base": plain, "base+adapter (unmerged)": lora}
        if merged is not None:
            sides["merged"] = Engine(merged, threads=THREADS)
        for engine in sides.values():  # warm-up: page in weights, allocate buffers
            _decode_rate(engine, 8)
        rates: dict[str, list] = {k: [] for k in sides}
        for _ in range(rounds):
            for name, engine in sides.items():
                rates[name].append(_decode_rate(engine, tokens))
        for engine in sides.values():
            engine.close()
    med = {k: statistics.median(v) for k, v in rates.items()}
    for name, rate in med.items():
        lo, hi = min(rates[name]), max(rates[name])
        print(f"decode {name:26s} {rate:6.1f} tok/s  ({lo:.1f}-{hi:.1f})  "
              f"{rate / med['base']:.2f}x base")
    return med


def bench_peft(run: Path, base: Path, adapter: Path, rounds: int, tokens: int) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_tune import models
    from edge_tune.llama.engine import Engine

    if THREADS:
        torch.set_num_threads(THREADS)
    hf_dir = models.dequantized_copy(base)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(model, run / "adapter").eval()
    ids = tok(PROMPT, return_tensors="pt")

    def hf_rate() -> float:
        # Decode rate: time for N tokens minus time for 1 (the prefill), over N - 1 tokens.
        with torch.inference_mode():
            t = time.perf_counter()
            model.generate(**ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            first = time.perf_counter() - t
            t = time.perf_counter()
            out = model.generate(**ids, max_new_tokens=tokens, min_new_tokens=tokens,
                                 do_sample=False)
            whole = time.perf_counter() - t
        n = out.shape[1] - ids["input_ids"].shape[1]
        return (n - 1) / (whole - first)

    engine = Engine(base, threads=THREADS)
    engine.add_adapter(adapter, "a")
    engine.activate("a")
    hf_rate()
    _decode_rate(engine, 8)
    rates: dict[str, list] = {"llama.cpp": [], "transformers+peft": []}
    for _ in range(rounds):
        rates["llama.cpp"].append(_decode_rate(engine, tokens))
        rates["transformers+peft"].append(hf_rate())
    engine.close()
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"same adapter, greedy decode on CPU ({torch.get_num_threads()} torch threads): "
          f"edge-tune llama.cpp {med['llama.cpp']:.1f} tok/s, transformers+PEFT "
          f"{med['transformers+peft']:.1f} tok/s   -> "
          f"{med['llama.cpp'] / med['transformers+peft']:.1f}x")
    return med


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="an edge-tune run directory")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--parts", default="switch,decode,peft")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for both llama.cpp and torch [default: physical "
                        "cores]; on a busy shared machine 1 is the fair, stable choice")
    args = parser.parse_args(argv)
    global THREADS
    THREADS = args.threads

    from edge_tune import api

    target = api.resolve_chat(args.run, None)
    parts = args.parts.split(",")
    print(f"base {target.base.name}, adapter {target.adapter}; threads {THREADS or 'auto'}; "
          f"{args.rounds} interleaved "
          f"rounds, medians; shared machine: expect 10-30 % noise")
    if "switch" in parts:
        bench_switch(target.base, target.adapter, args.rounds)
    if "decode" in parts:
        bench_decode(args.run, target.base, target.adapter, args.rounds, args.tokens)
    if "peft" in parts:
        bench_peft(args.run, target.base, target.adapter, args.rounds, args.tokens)


if __name__ == "__main__":
    sys.exit(main())
