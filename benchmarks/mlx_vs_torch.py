"""mlx (mlx-lm LoRA) against torch + PEFT (the cpu backend): tokens/s for the same run.

Both sides run `edge-tune train` end to end on the same data, model, steps, batch, rank and
seed, interleaved round by round (the machine's speed drifts); the figure is the training
loop's own tokens/s from each run's manifest. On Linux mlx runs on its CPU build (`mlx[cpu]`),
which is far slower than torch there; on Apple Silicon mlx uses Metal and is the backend `auto`
picks, so the Mac number is the one that matters there.

    python benchmarks/mlx_vs_torch.py [--model default|tiny] [--steps 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(backend: str, model: str, data: Path, args, out: Path) -> float:
    cmd = [sys.executable, "-m", "edge_tune", "train", "--backend", backend, "--model", model,
           "--data", str(data), "--max-steps", str(args.steps), "--batch-size",
           str(args.batch_size), "--seq-len", str(args.seq_len), "--rank", str(args.rank),
           "--out", str(out), "--no-verify"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.exit(f"{backend}: train failed:\n{proc.stderr[-2000:]}")
    return json.loads((out / "manifest.json").read_text())["result"]["tokens_per_second"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M) or 'tiny' "
                   "(a random 2-block Llama with SmolLM2's tokenizer)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    from edge_tune import models
    from edge_tune.demo import demo_data

    work = Path(tempfile.mkdtemp(prefix="mlx-vs-torch-"))
    model = args.model
    if model == "tiny":
        sys.path.insert(0, str(REPO))  # the tests.helpers package
        from tests.helpers.tiny_models import tiny_llama_gguf

        model = str(tiny_llama_gguf(work / "tiny.gguf", models.default_gguf()))
    speeds: dict[str, list[float]] = {"cpu": [], "mlx": []}
    for r in range(args.repeats):
        for backend in ("cpu", "mlx"):
            tps = run(backend, model, demo_data(), args, work / f"{backend}-{r}")
            speeds[backend].append(tps)
            print(f"round {r + 1}: {backend:4s} {tps:8.1f} tok/s", flush=True)
    torch_tps, mlx_tps = (statistics.median(speeds[b]) for b in ("cpu", "mlx"))
    print(f"\n{args.model} model, {args.steps} steps, batch {args.batch_size}, rank {args.rank}, "
          f"{platform.machine()} {platform.system()}")
    print(f"torch + PEFT (cpu backend): {torch_tps:8.1f} tok/s")
    print(f"mlx-lm (mlx backend):       {mlx_tps:8.1f} tok/s")
    print(f"mlx / torch:                {mlx_tps / torch_tps:8.3f}x")


if __name__ == "__main__":
    main()
