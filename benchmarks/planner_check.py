"""The planner against measurement: predicted vs measured peak RSS of real training runs.

Each configuration runs `edge-tune train` (cpu backend, 2 steps) on text long enough that
every example fills --seq-len, so the largest batch is exactly batch x seq-len, and compares
the plan stored in the run's manifest with the training process's measured high-water RSS
(`result.peak_rss_bytes`, getrusage). Target: within +-25 %.

    python benchmarks/planner_check.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GIB = 1024 ** 3

# (model, rank, batch, seq_len, extra flags)
CONFIGS = [
    ("tiny", 8, 4, 256, []),
    ("small", 16, 8, 512, []),
    ("default", 16, 4, 256, []),
    ("default", 8, 8, 512, []),
    ("default", 64, 2, 1024, []),
    ("default", 16, 4, 512, ["--precision", "fp32"]),
    ("default", 16, 8, 512, ["--grad-checkpoint"]),
    ("default", 16, 4, 1024, ["--grad-checkpoint"]),
]


def long_text_data(path: Path, n: int = 64) -> Path:
    rng = random.Random(0)
    words = ("river stone light green ocean quiet market seven bright winter garden "
             "paper signal north music bridge").split()
    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(1500))}) + "\n")
    return path


def model_path(name: str, work: Path) -> str:
    from edge_tune import models

    if name == "default":
        models.dequantized_copy(models.default_gguf())
        return "default"
    sys.path.insert(0, str(REPO))  # the tests.helpers package
    from tests.helpers.tiny_models import tiny_llama_gguf

    shape = {} if name == "tiny" else dict(hidden=256, blocks=4, heads=4, kv_heads=2, ffn=768)
    gguf = tiny_llama_gguf(work / f"{name}.gguf", models.default_gguf(), **shape)
    models.dequantized_copy(gguf)  # outside the measured process: training, not dequantizing
    return str(gguf)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="only the first three configurations")
    p.add_argument("--only", type=int, nargs="*", help="only these rows (0-based)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="planner-check-"))
    data = long_text_data(work / "long.jsonl")
    rows = []
    for i, (name, rank, batch, seq, extra) in enumerate(CONFIGS[:3] if args.quick else CONFIGS):
        if args.only is not None and i not in args.only:
            continue
        out = work / f"run{i}"
        cmd = [sys.executable, "-m", "edge_tune", "train", "--model", model_path(name, work),
               "--backend", "cpu", "--data", str(data), "--train-on", "all", "--max-steps", "2",
               "--rank", str(rank), "--batch-size", str(batch), "--seq-len", str(seq),
               "--memory-gib", "1000", "--no-verify", "--out", str(out), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            sys.exit(f"{name}: train failed:\n{proc.stderr[-2000:]}")
        man = json.loads((out / "manifest.json").read_text())
        predicted = man["plan"]["estimate"]["peak_gib"]
        measured = man["result"]["peak_rss_bytes"] / GIB
        label = f"{name} r{rank} b{batch} L{seq} {' '.join(extra)}".strip()
        rows.append((label, predicted, measured))
        print(f"{label:40s} predicted {predicted:6.2f} GiB  measured {measured:6.2f} GiB  "
              f"error {predicted / measured - 1:+6.1%}", flush=True)
    worst = max(abs(p / m - 1) for _, p, m in rows)
    print(f"\nworst error {worst:.1%} (target <= 25%)")
    print("\n| configuration | predicted GiB | measured GiB | error |\n|---|---|---|---|")
    for label, pr, me in rows:
        print(f"| {label} | {pr:.2f} | {me:.2f} | {pr / me - 1:+.0%} |")


if __name__ == "__main__":
    main()
