"""Multi-process CPU training (torchrun + gloo) against one process: tokens/s, same global batch.

Both sides run `edge-tune train` end to end on the embedded model (or a tiny random Llama), with
the same data, steps, seed and global batch: one process takes batch B with 2 micro-batches per
step, `--nproc 2` takes batch B with 1 micro-batch on each of 2 ranks. Runs are interleaved
round by round (the machine is shared and its speed drifts). The figure is the training loop's
tokens/s from each run's manifest (rank 0's aggregate over all ranks for --nproc 2).

On a 2-core machine expect little or no gain: one process already uses both cores for its
matmuls, and two ranks get one core each plus a gradient all_reduce per step. The point of
--nproc on CPU is correctness (tests/integration/test_distributed.py) and the path to more machines.

    python benchmarks/distributed_cpu.py [--model default|tiny] [--steps 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(model: str, data: Path, args, out: Path, nproc: int) -> dict:
    cmd = [sys.executable, "-m", "edge_tune", "train", "--backend", "cpu", "--model", model,
           "--data", str(data), "--max-steps", str(args.steps), "--batch-size",
           str(args.batch_size), "--seq-len", str(args.seq_len), "--out", str(out),
           "--no-verify", "--grad-accum", str(2 // nproc), "--nproc", str(nproc)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO)
    if proc.returncode:
        sys.exit(f"nproc {nproc}: train failed:\n{proc.stderr[-2000:]}")
    return json.loads((out / "manifest.json").read_text())["result"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M) or 'tiny'")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4, help="per micro-batch")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    from edge_tune import models
    from edge_tune.demo import demo_data

    data = demo_data()
    with tempfile.TemporaryDirectory(prefix="edge-tune-dist-bench-") as tmp:
        model = args.model
        if model == "tiny":
            from tests.tiny_models import tiny_llama_gguf

            model = str(tiny_llama_gguf(Path(tmp) / "tiny.gguf", models.default_gguf()))
        speeds: dict[int, list[float]] = {1: [], 2: []}
        for r in range(args.repeats):
            for nproc in (1, 2) if r % 2 == 0 else (2, 1):
                res = run(model, data, args, Path(tmp) / f"run-{r}-{nproc}", nproc)
                speeds[nproc].append(res["tokens_per_second"])
                print(f"round {r + 1}: nproc {nproc}: {res['tokens_per_second']:.0f} tok/s "
                      f"(final loss {res['final_loss']:.4f})", flush=True)
    one, two = statistics.median(speeds[1]), statistics.median(speeds[2])
    print(f"\nmodel {args.model}, {os.cpu_count()} CPUs, global batch {2 * args.batch_size}, "
          f"{args.steps} steps, median of {args.repeats}")
    print(f"1 process:   {one:.0f} tok/s")
    print(f"2 processes: {two:.0f} tok/s  ({two / one:.2f}x of 1 process)")


if __name__ == "__main__":
    main()
