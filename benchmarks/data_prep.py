"""Data preparation speed, and padding saved by batching choices.

    python benchmarks/data_prep.py [--records 100000]

1. rows/s: a JSONL of N synthetic chat records (built from the demo data, so the lengths are
   realistic) goes through what ``train`` does before the first step: read + validate
   (``read_records``) and render + tokenize + mask (``encode``) with the default model's
   tokenizer. Reported per stage, against the obvious alternative for the tokenize stage:
   rendering with ``apply_chat_template(tokenize=True)`` alone, which gives no loss mask.
2. Padding on the demo data at batch 8 (seq-len 512): random batches padded to the longest
   (what HF Trainer does), edge-tune's length-grouped batches, and ``--pack`` rows.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path


def synthetic(n: int, seed: int = 0) -> list[dict]:
    from edge_tune.data.formats import read_jsonl
    from edge_tune.demo import demo_data

    base = [{"messages": r.messages} for r in read_jsonl(demo_data())]
    rng = random.Random(seed)
    return [base[rng.randrange(len(base))] for _ in range(n)]


def padding_report(examples, batch_size: int, seq_len: int) -> dict:
    from edge_tune.training.backends.cpu import length_grouped_batches, pack_rows

    lengths = [len(e.input_ids) for e in examples]
    real = sum(lengths)
    rng = random.Random(0)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    random_batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    grouped = length_grouped_batches(lengths, batch_size, random.Random(0))

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    packed = 0
    for b in grouped:
        rows = pack_rows([lengths[i] for i in b], seq_len)
        packed += len(rows) * max(sum(lengths[b[i]] for i in row) for row in rows)
    return {"real": real, "random": padded(random_batches), "grouped": padded(grouped),
            "packed": packed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    args = p.parse_args()

    from transformers import AutoTokenizer

    from edge_tune import models
    from edge_tune.data.formats import read_records
    from edge_tune.data.template import encode

    tok = AutoTokenizer.from_pretrained(str(models.dequantized_copy(models.default_gguf())))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in synthetic(args.records)))
        t = time.perf_counter()
        data = read_records(path)
        t_read = time.perf_counter() - t
    n = len(data.records)
    sample = data.records[: min(n, 10_000)]  # tokenizing is linear: time a slice
    t = time.perf_counter()
    for r in sample:
        encode(tok, r.messages, args.seq_len)
    t_encode = time.perf_counter() - t
    t = time.perf_counter()
    for r in sample:
        tok.apply_chat_template(r.messages, tokenize=True)
    t_plain = time.perf_counter() - t

    print(f"{n:,} records")
    print(f"read + validate      {n / t_read:>10,.0f} rows/s")
    print(f"render+tokenize+mask {len(sample) / t_encode:>10,.0f} rows/s  (edge-tune encode)")
    print(f"render+tokenize      {len(sample) / t_plain:>10,.0f} rows/s  (apply_chat_template, "
          "no mask)")
    print(f"  -> masking costs {t_encode / t_plain:.2f}x the plain tokenization")
    total = t_read + t_encode * n / len(sample)
    print(f"whole pipeline for {n:,} records: {total:.0f} s ({n / total:,.0f} rows/s)\n")

    from edge_tune.data.formats import read_jsonl
    from edge_tune.demo import demo_data

    demo = [encode(tok, r.messages, args.seq_len) for r in read_jsonl(demo_data())]
    pad = padding_report(demo, args.batch_size, args.seq_len)
    print(f"demo data, batch {args.batch_size}: {pad['real']} real tokens")
    for key, label in (("random", "random batches, padded"), ("grouped", "length-grouped"),
                       ("packed", f"packed rows (<= {args.seq_len})")):
        waste = pad[key] - pad["real"]
        print(f"  {label:<28} {pad[key]:>7} computed, {waste:>6} padding "
              f"({waste / pad[key]:.1%})")


if __name__ == "__main__":
    main()
