"""Phi-3 LongRoPE (Phi-3-mini-128k, Phi-3.5-mini, Phi-4-mini) on mlx: the same numbers as torch
and llama.cpp.

mlx-lm's ``SuScaledRoPE`` always rotates by ``long_factor``; transformers takes
``short_factor`` for sequences within ``original_max_position_embeddings`` and llama.cpp
``rope_factors_short`` for contexts within it. ``mlx_config`` hands mlx the short factors and
refuses a ``--seq-len`` past the original context. The model: the tiny phi3 family
(tests/helpers/tiny_families.py) with a LongRoPE config as the real models have (context 131072 from
4096, distinct short and long factors), converted by llama.cpp's converter and dequantized
back, as a user's GGUF is. Tolerance and engines as tests/integration/test_family_parity.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
from tests.helpers.engines import MESSAGES, TOL, rel_err, three_engines
from tests.helpers.tiny_families import convert, family_hf

pytest.importorskip("mlx_lm")
pytest.importorskip("llama_cpp")

HALF_HEAD = 8  # head_dim 16 (hidden 64, 4 heads): one factor per rotated pair


@pytest.fixture(scope="module")
def longrope(tmp_path_factory):
    """(F32 GGUF, its dequantized HF copy) of a tiny Phi-3 with LongRoPE."""
    from edge_tune import models

    hf = tmp_path_factory.mktemp("phi3long") / "hf"
    shutil.copytree(family_hf("phi3"), hf)
    cfg = json.loads((hf / "config.json").read_text())
    cfg.update(max_position_embeddings=131072, original_max_position_embeddings=4096,
               sliding_window=262144, rope_scaling={
                   "type": "longrope",
                   "short_factor": [1.0 + 0.1 * i for i in range(HALF_HEAD)],
                   "long_factor": [1.0 + 0.5 * i for i in range(HALF_HEAD)]})
    (hf / "config.json").write_text(json.dumps(cfg))
    gguf = convert("phi3", hf, hf.parent / "phi3long.gguf")
    return gguf, models.dequantized_copy(gguf)


def test_mlx_runs_longrope_with_the_short_factors_as_torch_and_llama_cpp(longrope, capsys):
    from transformers import AutoTokenizer

    gguf, hf_dir = longrope
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = tok(tok.apply_chat_template(MESSAGES * 2, tokenize=False),
              add_special_tokens=False)["input_ids"]
    errs, k, lm, lt = three_engines(gguf, hf_dir, ids)
    long_err = rel_err(long_factor_logits(hf_dir, ids), lt)
    with capsys.disabled():
        print(f"\nphi3 longrope: {len(ids)} tokens: "
              + ", ".join(f"{p} {e:.1e}" for p, e in errs.items())
              + f"; mlx with the long factors vs torch {long_err:.1e}")
    assert k == 4096
    assert max(errs.values()) <= TOL, errs
    assert long_err > 100 * TOL  # the test can tell


def long_factor_logits(hf_dir, ids):
    """mlx-lm's logits with the long factors, as its ``SuScaledRoPE`` applies them unasked."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load

    from edge_tune.training.backends.mlx_config import mlx_load_kwargs

    kw = mlx_load_kwargs(hf_dir)
    rope = json.loads((hf_dir / "config.json").read_text())["rope_parameters"]
    kw["model_config"]["rope_scaling"]["long_factor"] = rope["long_factor"]
    model, _ = load(str(hf_dir), **kw)
    return np.array(model(mx.array([ids]))[0].astype(mx.float32), dtype=np.float64)


def test_mlx_refuses_a_seq_len_past_the_original_context(longrope):
    from edge_tune.training.backends.mlx_config import mlx_load_kwargs
    from edge_tune.errors import EdgeTuneError

    _, hf_dir = longrope
    scaling = mlx_load_kwargs(hf_dir, 4096)["model_config"]["rope_scaling"]
    assert scaling["long_factor"] == scaling["short_factor"]
    with pytest.raises(EdgeTuneError, match=r"^--seq-len 4097: mlx-lm's phi3 model applies one "
                                            r"LongRoPE factor set.*--backend cpu\)$"):
        mlx_load_kwargs(hf_dir, 4097)
