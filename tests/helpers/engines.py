"""The same tokens' logits from torch, mlx and llama.cpp, and their relative errors."""

from __future__ import annotations

import json

import numpy as np


TOL = 1e-3


MESSAGES = [{"role": "user", "content": "Hello there! How can I help you today? The quick "
                                        "brown fox."},
            {"role": "assistant", "content": "The answer is 42. def add(a, b): return a + b"}]


def rel_err(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def torch_logits(hf_dir, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def mlx_logits(hf_dir, ids, translate: bool = True):
    """mlx-lm's logits, loaded as the mlx backend loads the model (``translate=False``: as
    stock ``mlx_lm.load`` does)."""
    import mlx.core as mx
    from mlx_lm import load

    from edge_tune.training.backends.mlx_config import mlx_load_kwargs

    model, _ = load(str(hf_dir), **(mlx_load_kwargs(hf_dir) if translate else {}))
    return np.array(model(mx.array([ids]))[0].astype(mx.float32), dtype=np.float64)


def llama_logits(gguf, ids):
    from edge_tune.llama.engine import Engine

    with Engine(gguf, n_ctx=max(64, len(ids) + 8), logits_all=True, exact=True) as eng:
        return eng.logits(ids).astype(np.float64)


def three_engines(gguf_for_llama, hf_dir, ids):
    """{"torch-llama.cpp": err, "mlx-torch": err, "mlx-llama.cpp": err} and mlx's exact
    length, errors over the positions mlx computes exactly."""
    from edge_tune.training.backends.mlx_config import mlx_exact_length

    lt, ll = torch_logits(hf_dir, ids), llama_logits(gguf_for_llama, ids)
    lm = mlx_logits(hf_dir, ids)
    k = mlx_exact_length(json.loads((hf_dir / "config.json").read_text())) or len(ids)
    errs = {"torch-llama.cpp": rel_err(lt, ll), "mlx-torch": rel_err(lm[:k], lt[:k]),
            "mlx-llama.cpp": rel_err(lm[:k], ll[:k])}
    return errs, k, lm, lt
