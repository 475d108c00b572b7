"""Speculative decoding (prompt lookup) against plain decoding, on the serving engine.

    python benchmarks/speculative.py [--n 12] [--threads 1] [--modes auto,ngram] [--adapter RUN]

Two workloads, greedy, each answer from an empty context (no prompt cache, so every side
evaluates the same prompt):

* ``extraction``: a short support email from ``benchmarks/data/triage_heldout.jsonl`` turned
  into JSON after one worked example (an answer that copies names, products and sentences
  from its prompt: what prompt lookup is for);
* ``chat``: the general prompts of ``edge_tune/assets/drift_prompts.jsonl`` (free text, little
  to copy: what it must not slow down).

For every prompt the sides run back to back, in an order that alternates from prompt to
prompt (the machine is shared and noisy). With ``--parallel N`` every workload is also served
whole through the server's scheduler, N requests decoded together, twice per side in
reversed orders (aggregate tokens/s over the wall time of the lot). Printed per workload and side: decode tokens/s (all
completion tokens over the answer's wall time, prompt included: the whole cost of an answer),
the ratio to plain decoding, tokens guessed / kept, and how many answers differ from plain
decoding's (must be 0: the answers are the same token for token).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EMAILS = ROOT / "benchmarks" / "data" / "triage_heldout.jsonl"
CHAT = ROOT / "edge_tune" / "assets" / "drift_prompts.jsonl"

EXAMPLE = ("Hi,\n\nMy order of the blue kettle never arrived. Could you look into it?\n\n"
           "Best,\nAnna",
           '{"customer": "Anna", "product": "blue kettle", "problem": "My order of the blue '
           'kettle never arrived.", "urgent": false}')
INSTRUCTION = ("Extract the customer, the product and the problem (the sentence that states "
               "it, copied exactly) from the email, and whether it is urgent, as JSON.\n\n"
               "Email:\n{example}\nJSON:\n{answer}\n\nEmail:\n{email}\nJSON:\n")


def workloads(n: int) -> dict[str, list[list[dict]]]:
    """{workload: [messages, ...]} with ``n`` conversations each."""
    emails = [json.loads(line)["messages"][0]["content"]
              for line in EMAILS.read_text().splitlines() if line.strip()]
    chats = [json.loads(line)["prompt"] for line in CHAT.read_text().splitlines()
             if line.strip()]
    extraction = [[{"role": "user", "content": INSTRUCTION.format(
        example=EXAMPLE[0], answer=EXAMPLE[1], email=e)}] for e in emails[:n]]
    chat = [[{"role": "user", "content": c}] for c in chats[:n]]
    return {"extraction": extraction, "chat": chat}


def answer(engine, messages, spec, max_tokens: int) -> tuple[str, list, dict]:
    """(text, [completion tokens, seconds, decode tokens, decode seconds], draft counts)
    of one greedy answer; decode: the tokens after the first piece's, over the time from
    that piece to the last (the prompt's evaluation left out)."""
    engine.speculative = spec
    engine.draft_stats = {k: 0 for k in engine.draft_stats}
    start = time.perf_counter()
    pieces, first = [], None
    for piece in engine.generate(messages=messages, temperature=0, max_tokens=max_tokens):
        pieces.append(piece)
        if first is None:
            first = (time.perf_counter(), piece.completion_tokens)
    end = time.perf_counter()
    tokens = pieces[-1].completion_tokens
    return ("".join(p.text for p in pieces),
            [tokens, end - start, tokens - first[1], end - first[0]], dict(engine.draft_stats))


def batched(engine, convs, spec, max_tokens: int) -> tuple[list[str], int, float]:
    """(answers, completion tokens, seconds) of every conversation submitted at once to a
    scheduler on ``engine`` (greedy)."""
    import asyncio

    from edge_tune.server.openai_shapes import GenRequest
    from edge_tune.server.scheduler import Scheduler

    engine.speculative = spec
    scheduler = Scheduler(engine)

    async def serve():
        jobs = [scheduler.submit(GenRequest("chat", "base", True, messages=m, temperature=0,
                                            max_tokens=max_tokens)) for m in convs]
        texts, tokens = [], 0
        for job in jobs:
            pieces, (kind, last) = await job.rest_of_answer(await job.events.get())
            if kind == "error":
                raise last
            tokens += last.completion_tokens
            texts.append("".join(p.text for p in pieces) + last.text)
        return texts, tokens

    start = time.perf_counter()
    try:
        texts, tokens = asyncio.run(serve())
    finally:
        scheduler.close()
    return texts, tokens, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=12, help="prompts per workload")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", default="auto", help="speculative modes besides 'off'")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--adapter", type=Path, help="a run directory or adapter .gguf")
    ap.add_argument("--draft-max", type=int, default=None)
    ap.add_argument("--only", default="extraction,chat", help="workloads to run")
    ap.add_argument("--parallel", type=int, default=0,
                    help="also serve each workload N requests at a time (0: not)")
    ap.add_argument("--no-single", action="store_true", help="only the --parallel runs")
    args = ap.parse_args()

    from edge_tune import models
    from edge_tune.llama.engine import Engine
    from edge_tune.llama.speculative import Speculative

    engine = Engine(models.default_gguf(), n_ctx=2048, threads=args.threads, parallel=1,
                    prompt_cache=False)
    if args.adapter is not None:
        path = args.adapter / "adapter.gguf" if args.adapter.is_dir() else args.adapter
        engine.add_adapter(path, "tuned")
        engine.activate("tuned")
    kw = {} if args.draft_max is None else {"draft_max": args.draft_max}
    sides = {"off": None, **{m: Speculative(m, **kw) for m in args.modes.split(",")}}
    names = list(sides)
    for work, convs in workloads(args.n).items():
        if work not in args.only.split(",") or args.no_single:
            continue
        # tokens, seconds, decode tokens, decode seconds, drafted, kept
        totals = {s: [0, 0.0, 0, 0.0, 0, 0] for s in names}
        differ = {s: 0 for s in names}
        for i, messages in enumerate(convs):
            order = names if i % 2 == 0 else names[::-1]
            got = {s: answer(engine, messages, sides[s], args.max_tokens) for s in order}
            for s, (text, counts, stats) in got.items():
                t = totals[s]
                for k, v in enumerate(counts + [stats["drafted"], stats["kept"]]):
                    t[k] += v
                differ[s] += text != got["off"][0]
        off = totals["off"]
        print(f"{work} ({len(convs)} prompts, {args.max_tokens} tokens at most, "
              f"{args.threads} thread(s){', adapter' if args.adapter else ''}):")
        for s in names:
            tokens, seconds, dtokens, dseconds, drafted, kept = totals[s]
            rate, decode = tokens / seconds, dtokens / dseconds
            print(f"  {s:6s} decode {decode:6.1f} tok/s x{decode / (off[2] / off[3]):.2f}  "
                  f"answer {rate:6.1f} tok/s x{rate / (off[0] / off[1]):.2f}  "
                  f"{tokens} tokens  guessed {drafted} kept {kept}  "
                  f"answers differing from off: {differ[s]}", flush=True)
    if args.parallel:
        many = Engine(models.default_gguf(), n_ctx=2048, threads=args.threads,
                      parallel=args.parallel, prompt_cache=False)
        for work, convs in workloads(args.n).items():
            if work not in args.only.split(","):
                continue
            got = {s: [None, 0, 0.0] for s in names}
            for order in (names, names[::-1]):  # two rounds, the sides' order reversed
                for s in order:
                    texts, tokens, seconds = batched(many, convs, sides[s], args.max_tokens)
                    got[s] = [texts, got[s][1] + tokens, got[s][2] + seconds]
            off = got["off"][1] / got["off"][2]
            print(f"{work}, {args.parallel} at a time (two rounds):")
            for s in names:
                texts, tokens, seconds = got[s]
                differing = sum(a != b for a, b in zip(texts, got["off"][0]))
                print(f"  {s:6s} {tokens / seconds:6.1f} tok/s x{tokens / seconds / off:.2f}  "
                      f"{tokens} tokens  answers differing from off: {differing}", flush=True)


if __name__ == "__main__":
    main()
