"""--pack against length-grouped batches (the default): training tokens/s on the demo data.

Both run `edge-tune train` on the embedded model with the same steps, batch and seed,
interleaved round by round; tokens/s counts real (non-padding) tokens, from each manifest.

    python benchmarks/packing_speed.py [--steps 20] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    from edge_tune.demo import demo_data

    work = Path(tempfile.mkdtemp(prefix="packing-"))
    speeds: dict[str, list[float]] = {"grouped": [], "packed": []}
    for r in range(args.repeats):
        for mode in speeds:
            out = work / f"{mode}-{r}"
            cmd = [sys.executable, "-m", "edge_tune", "train", "--data", str(demo_data()),
                   "--max-steps", str(args.steps), "--backend", "cpu", "--no-verify",
                   "--memory-gib", "1000", "--out", str(out),
                   "--pack" if mode == "packed" else "--no-pack"]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode:
                sys.exit(proc.stderr[-2000:])
            tps = json.loads((out / "manifest.json").read_text())["result"]["tokens_per_second"]
            speeds[mode].append(tps)
            print(f"round {r + 1}: {mode:8s} {tps:7.1f} tok/s", flush=True)
    g, k = (statistics.median(speeds[m]) for m in ("grouped", "packed"))
    print(f"\nlength-grouped {g:.1f} tok/s, packed {k:.1f} tok/s: packed/grouped {k / g:.2f}x")


if __name__ == "__main__":
    main()
