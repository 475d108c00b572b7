"""``uq.fit`` (the unsloth backend's Trainer loop, without Unsloth) as one process or as a
rank under torchrun with gloo: what tests/integration/test_unsloth_backend.py compares.

    python -m tests.helpers.unsloth_fit_ranks OUT GRAD_ACCUM
    python -m torch.distributed.run --nproc-per-node 2 -m tests.helpers.unsloth_fit_ranks OUT 1

(from the repository root).
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path


def main(out: Path, accum: int) -> None:
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    from tests.helpers.unsloth_model import config, tiny_peft_llama

    from edge_tune.training.backends import unsloth as uq
    from edge_tune.data import sharding
    from edge_tune.data.template import IGNORE, Example

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rng = random.Random(0)
    data = []
    for _ in range(24):  # prompt tokens (no loss), then an answer to learn
        n = rng.randint(4, 14)
        prompt = [rng.randint(3, 63) for _ in range(n)]
        answer = [7, 8, 9, rng.randint(10, 12), 2]
        data.append(Example(prompt + answer, [IGNORE] * n + answer))
    mine = sharding.shard(range(len(data)), accum * world, sharding.rank_slots(rank, accum))
    job = {"config": config(batch_size=2, grad_accum=accum, max_steps=10, lr=1e-2,
                            warmup_steps=2, seed=4),
           "examples": [data[i] for i in mine], "example_index": mine, "pad_id": 0,
           "val_examples": []}
    model = tiny_peft_llama()
    result = uq.fit(model, job, lambda event: None, "none")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        lora = {k: v.detach().contiguous() for k, v in model.state_dict().items()
                if "lora_" in k}
        save_file(lora, str(out / "lora.safetensors"))
        (out / "result.json").write_text(json.dumps({**result.to_dict(), "shard": len(mine)}))
    if world > 1:
        dist.destroy_process_group()
        # Leave without C++ static teardown: a gloo rank once aborted there ("terminate called
        # without an active exception") after its work was done, failing the launch.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
