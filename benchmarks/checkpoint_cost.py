"""What a resumable checkpoint costs: writing RUN/checkpoint (LoRA weights + AdamW state +
step and losses, safetensors + JSON) against one training step, on the embedded model.

Default settings: LoRA r=16 on all seven projections, batch 8 of demo examples. The two are
interleaved (step, save, step, save, ...) because the machine is shared and its speed drifts;
the medians are printed with their ratio, which is what ``--save-every`` trades: saving every
N steps costs about ratio/N of the training time.

    .venv/bin/python benchmarks/checkpoint_cost.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from edge_tune import models
    from edge_tune.training import checkpoint
    from edge_tune.training.backends import cpu
    from edge_tune.config import TrainConfig
    from edge_tune.data.formats import read_records
    from edge_tune.data.template import encode_record
    from edge_tune.demo import demo_data
    from edge_tune.hardware import probe

    hf_dir = models.dequantized_copy(models.default_gguf())
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    records = read_records(demo_data()).records[:64]
    examples = [encode_record(tok, r.messages, r.text) for r in records]
    cfg = TrainConfig(data="demo").to_dict()
    bf16 = cpu.use_bf16("auto", probe().has_bf16_cpu)
    model = cpu.build_model(hf_dir, cfg, bf16)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    pad = tok.pad_token_id or 0
    rng = random.Random(0)

    def step() -> float:
        batch = rng.sample(examples, 8)
        ids, labels, mask = cpu.collate(batch, pad)
        t = time.perf_counter()
        with cpu.compute_precision(model, bf16):
            loss = cpu.response_loss(model, ids, labels, mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    step()  # warm-up, and the optimizer state exists from here on
    steps, saves = [], []
    with tempfile.TemporaryDirectory() as run_dir:
        for _ in range(args.rounds):
            steps.append(step())
            t = time.perf_counter()
            checkpoint.save(Path(run_dir), model, opt, {
                "step": 1, "total": 100, "slots": 1, "tokens": 0, "losses": [1.0] * 100,
                "val_loss": None, "train_seconds": 1.0})
            saves.append(time.perf_counter() - t)
        size = sum(f.stat().st_size for f in (Path(run_dir) / "checkpoint").iterdir())
    s, c = statistics.median(steps), statistics.median(saves)
    print(f"training step (batch 8): median {s:.2f} s over {args.rounds}")
    print(f"checkpoint save:         median {c:.2f} s ({size / 2**20:.0f} MiB)")
    print(f"ratio save/step: {c / s:.2f}  -> --save-every 50 costs {100 * c / s / 50:.1f}% "
          "of training time (shared, noisy machine: interleaved medians)")


if __name__ == "__main__":
    main()
