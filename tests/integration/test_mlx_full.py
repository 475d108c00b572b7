"""``train --backend mlx --full``: every weight trains on mlx (mlx's Linux CPU build, tiny
random Llama) and the run ships like the cpu backend's full run: ``model/`` (HF layout) that
``train`` converts to ``model.gguf`` with llama.cpp's converter and verifies.

The layout is checked for real: torch and mlx, each loading ``RUN/model``, compute the same
logits, and those differ from the base's (the weights moved)."""

from __future__ import annotations

import json

import numpy as np
import pytest


pytest.importorskip("mlx_lm")


@pytest.mark.slow
def test_mlx_full_run_writes_hf_weights_that_export_and_verify(tiny, demo_jsonl, tmp_path):
    import mlx.core as mx
    import torch
    from mlx_lm import load
    from transformers import AutoModelForCausalLM

    from edge_tune import api
    from edge_tune.config import build
    from edge_tune.events import Log

    logs = []
    out = tmp_path / "run"
    cfg = build(None, data=str(demo_jsonl), out=str(out), model=str(tiny), max_steps=4,
                batch_size=2, seq_len=64, lr=1e-3, seed=3, val_split=0.05, backend="mlx",
                report_to="none", full=True)
    result = api.train(cfg, lambda e: logs.append(e.message) if isinstance(e, Log) else None)
    man = json.loads((out / "manifest.json").read_text())
    assert man["kind"] == "full" and man["backend"] == "mlx"
    assert (out / "model" / "model.safetensors").is_file() and (out / "model.gguf").is_file()
    assert not (out / "mlx").exists() and not (out / "adapter").exists()
    # every weight trained: embeddings, norms and blocks (the tiny model has ~3.2M)
    assert result.manifest.result.extra["trainable_parameters"] > 3_000_000
    assert any(line.startswith("verify:") and line.endswith("(ok)") for line in logs), logs

    tokens = [1, 42, 300, 7, 2000, 15, 99]
    mlx_model, _ = load(str(out / "model"))
    got = np.array(mlx_model(mx.array([tokens]))[0].astype(mx.float32))
    with torch.no_grad():
        tuned = AutoModelForCausalLM.from_pretrained(str(out / "model"), dtype=torch.float32)
        want = tuned(torch.tensor([tokens])).logits[0].numpy()
        base = AutoModelForCausalLM.from_pretrained(result.manifest.base.hf_dir,
                                                    dtype=torch.float32)
        before = base(torch.tensor([tokens])).logits[0].numpy()
    assert np.abs(got - want).max() < 1e-3  # same weights under the same names
    assert np.abs(want - before).max() > 1e-2  # and they moved
