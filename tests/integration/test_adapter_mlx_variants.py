"""mlx-lm adapters as mlx-lm itself writes them, in their config variants, exported by edge-tune
and run by llama.cpp: the adapter effect equals mlx-lm's own (tuned − base logits).

Made with mlx-lm's own ``linear_to_lora_layers`` on a tiny family checkpoint (mlx's CPU build),
saved as ``mlx_lm lora`` saves them (trainable parameters of the LoRA layers, and
``adapter_config.json``): ``fine_tune_type`` lora / dora (dora: merged export), ``num_layers``
a subset of the blocks or -1 (all), ``lora_parameters.keys`` a subset of the projections,
mixed spellings (the older ``lora_layers`` count and an unused ``alpha`` next to ``scale``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from tests.helpers.adapter_helpers import rel
from tests.helpers.tiny_families import family_gguf, family_hf

pytest.importorskip("mlx_lm")

TOKENS = [2, 17, 45, 101, 230, 7, 88, 301]
VARIANTS = [
    # id, family, fine_tune_type, config written beside the weights (num_layers, params)
    ("lora-last-block-q-down", "mistral", "lora",
     {"num_layers": 1, "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0,
                                           "keys": ["self_attn.q_proj", "mlp.down_proj"]}}),
    ("lora-all-blocks-default-keys", "qwen2", "lora",
     {"num_layers": -1, "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0}}),
    ("lora-old-spelling", "phi3", "lora",
     {"lora_layers": 2, "lora_parameters": {"rank": 4, "alpha": 16, "scale": 5.0,
                                            "dropout": 0.05}}),
    ("dora", "qwen3", "dora",
     {"num_layers": 2, "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0,
                                           "keys": ["self_attn.v_proj", "mlp.up_proj"]}}),
]


def make_mlx_adapter(hf_dir, out_dir, kind: str, cfg: dict):
    """(mlx base logits, mlx tuned logits) for a random adapter saved in ``out_dir``."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from edge_tune.training.backends.mlx_config import mlx_load_kwargs

    model, _ = load(str(hf_dir), **mlx_load_kwargs(hf_dir))
    model.freeze()
    ids = mx.array([TOKENS])
    base = np.array(model(ids)[0].astype(mx.float32))
    n = cfg.get("num_layers", cfg.get("lora_layers"))
    linear_to_lora_layers(model, n if n != -1 else len(model.layers), cfg["lora_parameters"],
                          use_dora=kind == "dora")
    mx.random.seed(0)
    params = dict(tree_flatten(model.trainable_parameters()))
    for k, v in params.items():  # lora_b starts at zero: give every part a value
        if k.endswith("lora_b"):
            params[k] = mx.random.normal(v.shape) * 0.05
        elif k.endswith(".m"):
            params[k] = v * (1.0 + 0.05 * mx.random.normal(v.shape))
    model.update(tree_unflatten(list(params.items())))
    model.eval()  # mlx modules start in training mode: dropout would be live
    tuned = np.array(model(ids)[0].astype(mx.float32))
    out_dir.mkdir()
    mx.save_safetensors(str(out_dir / "adapters.safetensors"), params)
    (out_dir / "adapter_config.json").write_text(json.dumps({"fine_tune_type": kind, **cfg}))
    return base, tuned


@pytest.mark.parametrize("case,family,kind,cfg", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_mlx_variant_runs_in_llama_cpp_like_in_mlx(case, family, kind, cfg, tmp_path):
    from edge_tune import api
    from edge_tune.llama.engine import Engine

    base, tuned = make_mlx_adapter(family_hf(family), tmp_path / "mlx", kind, cfg)
    want = tuned - base
    assert np.linalg.norm(want) > 0.05
    gguf = family_gguf(family)
    with Engine(gguf, n_ctx=64, logits_all=True, exact=True) as eng:
        plain = eng.logits(TOKENS)
        if kind == "dora":  # no GGUF LoRA form: the merged export is the route
            out = tmp_path / "merged.gguf"
            api.export(tmp_path / "mlx", base=gguf, out=out, merge=True, quant="F32")
            with Engine(out, n_ctx=64, logits_all=True, exact=True) as merged:
                got = merged.logits(TOKENS) - plain
        else:
            out = tmp_path / "a.gguf"
            api.export(tmp_path / "mlx", base=gguf, out=out)
            eng.activate(eng.add_adapter(out))
            got = eng.logits(TOKENS) - plain
    err = rel(got, want)
    print(f"{case} ({family}): adapter effect error vs mlx-lm {err:.2e}")
    assert err <= 0.02
